"""``editserve dataset create|get|cancel|download``: the IP2P data engine from the command line.

    editserve dataset create --triplets prompts.jsonl --samples 8 --keep-best 4 --size 256 --out data/
    editserve dataset get ID
    editserve dataset download ID --out data/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED = 0, 1


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 0.1,0.9), got {text!r}") from None
    return lo, hi


def add_dataset_parser(commands) -> None:
    dataset = commands.add_parser("dataset", help="IP2P data engine: P2P pairs from caption triplets, CLIP-filtered")
    actions = dataset.add_subparsers(dest="dataset_command", required=True)
    create = actions.add_parser("create", help="start a dataset job")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--triplets", type=Path, metavar="FILE.jsonl",
                        help="local JSONL, one {input, instruction, output} per line (sent inline)")
    source.add_argument("--triplets-key", metavar="KEY", help="a JSONL object already in the service's bucket")
    create.add_argument("--samples", type=int, dest="samples_per_triplet", help="samples per triplet (100)")
    create.add_argument("--p2p-fraction", type=_pair, metavar="LO,HI", help="range of p (0.1,0.9)")
    create.add_argument("--guidance", type=_pair, metavar="LO,HI", help="range of the CFG scale (7.5,15)")
    create.add_argument("--min-image-sim", type=float, help="image-image threshold (0.70; the paper: 0.75)")
    create.add_argument("--min-caption-sim", type=float, help="image-caption threshold (0.2)")
    create.add_argument("--min-direction-sim", type=float, help="directional threshold (0.2)")
    create.add_argument("--keep-best", type=int, help="kept pairs per triplet, at most (4)")
    create.add_argument("--model")
    create.add_argument("--size", type=int)
    create.add_argument("--steps", type=int)
    create.add_argument("--seed", type=int)
    create.add_argument("--webhook", metavar="URL")
    create.add_argument("--out", type=Path, help="wait for the job, then download its output here")
    create.add_argument("--wait-timeout", type=float, metavar="S")
    get = actions.add_parser("get", help="show a dataset job as JSON")
    get.add_argument("id")
    cancel = actions.add_parser("cancel", help="cancel a dataset job")
    cancel.add_argument("id")
    download = actions.add_parser("download", help="save manifest, metadata.jsonl and shards (waits if running)")
    download.add_argument("id")
    download.add_argument("--out", type=Path, required=True)
    download.add_argument("--wait-timeout", type=float, metavar="S")


def _read_triplets(path: Path) -> list[dict]:
    """Lines as dicts; ``caption``/``edit`` are accepted for ``input``/``instruction`` (as the server does)."""
    import json

    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "input" not in row and "caption" in row:
                row["input"] = row.pop("caption")
            if "instruction" not in row and "edit" in row:
                row["instruction"] = row.pop("edit")
            rows.append({k: row[k] for k in ("input", "instruction", "output") if k in row})
    return rows


def _wait_and_download(client, dataset_id: str, out: Path, timeout: float | None, quiet: bool) -> int:
    done = client.wait_dataset(dataset_id, timeout=timeout)
    if done.status.value != "succeeded":
        print(f"editserve: error: dataset {done.id} {done.status.value}", file=sys.stderr)
        return EXIT_FAILED
    if not quiet:
        c = done.counts
        print(f"dataset {done.id}: {c.kept} pairs kept of {c.samples} samples "
              f"({done.progress.done}/{done.progress.total} triplets)", file=sys.stderr)
    for path in client.download_dataset(done, out):
        print(path)
    return EXIT_OK


def cmd_dataset(client, args: argparse.Namespace) -> int:
    if args.dataset_command == "get":
        print(client.get_dataset(args.id).model_dump_json(indent=2))
        return EXIT_OK
    if args.dataset_command == "cancel":
        current = client.cancel_dataset(args.id)
        print(f"{current.id} {current.status.value}")
        return EXIT_OK
    if args.dataset_command == "download":
        return _wait_and_download(client, args.id, args.out, args.wait_timeout, args.quiet)
    thresholds = {k: v for k, v in (("image_image", args.min_image_sim), ("image_caption", args.min_caption_sim),
                                    ("directional", args.min_direction_sim)) if v is not None}
    triplets = _read_triplets(args.triplets) if args.triplets else None
    created = client.create_dataset(
        triplets, triplets_key=args.triplets_key, samples_per_triplet=args.samples_per_triplet,
        p2p_fraction=args.p2p_fraction, guidance=args.guidance, thresholds=thresholds or None,
        keep_best=args.keep_best, model=args.model, size=args.size, steps=args.steps, seed=args.seed,
        webhook=args.webhook)
    if args.out is None:
        print(created.id)
        return EXIT_OK
    if not args.quiet:
        print(f"dataset {created.id}: {created.progress.total} triplets", file=sys.stderr)
    return _wait_and_download(client, created.id, args.out, args.wait_timeout, args.quiet)

