"""The ``editserve`` command: submit P2P / IP2P edits, follow them, save the images.

    editserve edit p2p --source "a cat on a bike" --target "a dog on a bike" --out out/
    editserve edit ip2p --image cat.png --instruction "make it a watercolor" --sweep-image 1,1.5 --out out/
    editserve get ID | editserve cancel ID | editserve wait ID --out out/ | editserve list | editserve models

Server and key come from ``--url``/``--api-key`` or ``$EDITSERVE_URL``/``$EDITSERVE_API_KEY``. Progress goes
to stderr, saved paths to stdout (one per line), so the output pipes cleanly. Exit codes: 0 success,
1 the server refused or the edit failed/was canceled, 2 bad usage, 3 timed out, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from editserve import errors
from editserve.client import Client
from editserve.client import _local_validation_error as local_validation_error
from editserve.contract import SCHEDULERS, Edit, EditStatus, ErrorType, LocalBlend, Sweep
from editserve.kinds import EDIT_KINDS
from editserve.dataset_cli import add_dataset_parser, cmd_dataset
from editserve.progress import ProgressLine

# One exit code per kind of failure, so scripts can tell them apart (README "CLI exit codes").
EXIT_OK = 0
EXIT_FAILED = 1  # the edit ran and failed (edit.error says why)
EXIT_USAGE = 2  # invalid arguments or request, found before anything was sent (argparse uses 2 as well)
EXIT_TIMEOUT = 3  # --wait-timeout passed; the edit keeps running
EXIT_CANCELED = 4  # the edit was canceled
EXIT_REFUSED = 5  # the server answered an error status (4xx/5xx after retries): invalid, not found, limits
EXIT_UNREACHABLE = 6  # the server could not be reached
EXIT_LOCAL_IO = 7  # a local file could not be read or written
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_CODES_HELP = ("exit codes: 0 ok, 1 edit failed, 2 usage or invalid request, 3 wait timed out, 4 edit canceled, "
                   "5 server refused the request, 6 server unreachable, 7 local file error, 130 interrupted")


# ------------------------------------------------------------------------------------------------ parsing

def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _word_factor(text: str) -> tuple[str, float]:
    word, sep, factor = text.rpartition("=")
    try:
        if not sep or not word:
            raise ValueError
        return word, float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected word=factor (e.g. fluffy=2), got {text!r}") from None


def _add_common_edit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, help="denoising steps (default per model)")
    parser.add_argument("--model", help="model name (see `editserve models`)")
    parser.add_argument("--seed", type=int, help="random seed (echoed back in params)")
    parser.add_argument("--negative", metavar="TEXT", help="negative prompt: what to steer away from")
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), help="sampler (default per model)")
    parser.add_argument("--format", dest="output_format", choices=["png", "webp", "jpeg"],
                        help="file type of the results (default png); each file carries its parameters")
    parser.add_argument("--quality", dest="output_quality", type=int, metavar="Q", help="webp/jpeg quality 1-100")
    parser.add_argument("--preview-every", dest="preview_every", type=int, metavar="K",
                        help="a small preview every K steps (SSE `preview` events, `preview` in get)")
    parser.add_argument("--webhook", metavar="URL", help="POST signed events to this URL")
    parser.add_argument("--priority", choices=["high", "normal", "low"])
    parser.add_argument("--out", type=Path, help="folder for the images (required unless --no-wait)")
    parser.add_argument("--no-wait", action="store_true", help="print the edit id and return at once")
    parser.add_argument("--wait-timeout", type=float, metavar="S", help="give up waiting after S seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editserve", description="Edit images with Prompt-to-Prompt and "
                                     "InstructPix2Pix on an editserve server.", epilog=EXIT_CODES_HELP)
    parser.add_argument("--url", help="server URL, with or without /v1 (default $EDITSERVE_URL or "
                        "http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="API key (default $EDITSERVE_API_KEY)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    parser.add_argument("--retries", type=int, default=2, help="retries on connection errors, 429 and 503")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    edit = commands.add_parser("edit", help="submit an edit and save its images")
    kinds = edit.add_subparsers(dest="kind", required=True, metavar="KIND")

    p2p = kinds.add_parser("p2p", help="Prompt-to-Prompt: edit a generated image by changing its prompt")
    p2p.add_argument("--source", required=True, help="the source prompt")
    p2p.add_argument("--target", required=True, action="append", help="a target prompt (repeat for several)")
    p2p.add_argument("--mode", choices=["replace", "refine", "reweight", "none"], help="attention edit (replace)")
    p2p.add_argument("--reweight", nargs="+", type=_word_factor, metavar="WORD=FACTOR",
                     help="scale the attention of words, e.g. fluffy=2 (applies to every target)")
    p2p.add_argument("--blend-source", nargs="+", metavar="WORD", help="local blend: source words")
    p2p.add_argument("--blend-target", nargs="+", metavar="WORD", help="local blend: target words")
    p2p.add_argument("--blend-threshold", type=float, help="local blend mask threshold (0.3)")
    p2p.add_argument("--cross", type=float, metavar="F", help="cross-attention replace fraction of steps (0.8)")
    p2p.add_argument("--self", dest="self_replace", type=float, metavar="F",
                     help="self-attention replace fraction of steps (0.4)")
    p2p.add_argument("--maps", action="store_true", help="also return attention maps (saved with the images)")
    p2p.add_argument("--maps-overlay", action="store_true",
                     help="attention maps drawn over each prompt's image (implies --maps)")
    p2p.add_argument("--size", type=int, help="image height and width in pixels (multiple of 64)")
    p2p.add_argument("--guidance", type=float, help="classifier-free guidance scale (7.5)")
    _add_common_edit_options(p2p)

    ip2p = kinds.add_parser("ip2p", help="InstructPix2Pix: edit an image by a written instruction")
    ip2p.add_argument("--image", required=True, type=Path, help="input image file")
    ip2p.add_argument("--instruction", required=True, help='e.g. "turn it into a watercolor"')
    ip2p.add_argument("--text-guidance", type=float, help="text guidance s_T (7.5)")
    ip2p.add_argument("--image-guidance", type=float, help="image guidance s_I (1.5)")
    ip2p.add_argument("--resolution", type=int, help="long side of the resized input (512)")
    ip2p.add_argument("--sweep-image", type=_floats, metavar="F,F", help="grid over image guidance, e.g. 1,1.5")
    ip2p.add_argument("--sweep-text", type=_floats, metavar="F,F", help="grid over text guidance, e.g. 5,7.5")
    ip2p.add_argument("--sweep-seeds", type=_ints, metavar="N,N", help="grid over seeds, e.g. 1,2")
    _add_common_edit_options(ip2p)

    get = commands.add_parser("get", help="show an edit as JSON")
    get.add_argument("id")
    cancel = commands.add_parser("cancel", help="cancel an edit")
    cancel.add_argument("id")
    wait = commands.add_parser("wait", help="wait for an edit and save its images")
    wait.add_argument("id")
    wait.add_argument("--out", type=Path, help="folder for the images")
    wait.add_argument("--wait-timeout", type=float, metavar="S")
    listing = commands.add_parser("list", help="list your edits, newest first")
    listing.add_argument("--status", choices=[s.value for s in EditStatus])
    listing.add_argument("--kind", choices=list(EDIT_KINDS))
    listing.add_argument("--model")
    listing.add_argument("--limit", type=int, default=20)
    commands.add_parser("models", help="list the servable models")
    add_dataset_parser(commands)
    _accept_quiet_anywhere(parser)
    return parser


def _accept_quiet_anywhere(parser: argparse.ArgumentParser) -> None:
    """``-q`` also after the (sub)command: ``editserve edit p2p ... -q``. SUPPRESS keeps the top-level value
    when the subcommand's flag is absent."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("-q" in a.option_strings for a in sub._actions):
                    sub.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                                     help="no progress output")
                _accept_quiet_anywhere(sub)


# ------------------------------------------------------------------------------------------------ commands

class StatusReporter:
    """Progress to stderr: a live bar on a terminal, one line per status change otherwise."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = ProgressLine() if not quiet else None
        self.last_status: EditStatus | None = None

    def __call__(self, edit: Edit) -> None:
        if self.bar is None:
            return
        if self.bar.enabled:
            self.bar(edit)
        elif edit.status is not self.last_status:
            print(f"{edit.id} {edit.status.value}", file=sys.stderr)
        self.last_status = edit.status


def _p2p_fields(args: argparse.Namespace) -> dict[str, Any]:
    if bool(args.blend_source) != bool(args.blend_target):
        raise errors.InvalidRequestError("local blend needs both --blend-source and --blend-target words",
                                         type=ErrorType.invalid_request.value, field="local_blend")
    blend = None
    if args.blend_source:
        blend = _part(LocalBlend, "local_blend", source_words=args.blend_source, target_words=args.blend_target,
                      **({"threshold": args.blend_threshold} if args.blend_threshold else {}))
    return dict(edit=args.mode, reweight=dict(args.reweight) if args.reweight else None, local_blend=blend,
                cross_replace_steps=args.cross, self_replace_steps=args.self_replace,
                attention_maps=True if args.maps or args.maps_overlay else None,
                attention_maps_overlay=True if args.maps_overlay else None, size=args.size,
                guidance_scale=args.guidance)


def _part(model: type[BaseModel], field: str, **values: Any) -> Any:
    """A part of the request validated here, its errors named by their place in the request."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise local_validation_error(exc, prefix=field) from None


def _ip2p_fields(args: argparse.Namespace) -> dict[str, Any]:
    sweep = None
    if args.sweep_image or args.sweep_text or args.sweep_seeds:
        sweep = _part(Sweep, "sweep", image_guidance=args.sweep_image, text_guidance=args.sweep_text,
                      seeds=args.sweep_seeds)
    return dict(text_guidance=args.text_guidance, image_guidance=args.image_guidance, resolution=args.resolution,
                sweep=sweep)


def cmd_edit(client: Client, args: argparse.Namespace) -> int:
    if not args.no_wait and args.out is None:
        raise errors.InvalidRequestError("--out DIR is required (or pass --no-wait)", type=ErrorType.usage.value, field="--out")
    common = dict(steps=args.steps, model=args.model, seed=args.seed, webhook=args.webhook, priority=args.priority,
                  scheduler=args.scheduler)
    if args.negative:
        common["negative_prompt"] = args.negative
    common.update({k: v for k in ("output_format", "output_quality", "preview_every")
                   if (v := getattr(args, k)) is not None})
    if args.kind == "p2p":
        edit = client.submit_p2p(args.source, args.target, **common, **_p2p_fields(args))
    else:
        if not args.image.is_file():
            raise errors.InvalidRequestError(f"no such file: {args.image}", type=ErrorType.usage.value, field="--image")
        edit = client.submit_ip2p(args.image, args.instruction, **common, **_ip2p_fields(args))
    if args.no_wait:
        print(edit.id)
        return EXIT_OK
    if not args.quiet:
        print(f"submitted {edit.id} ({edit.kind}, model {edit.model})", file=sys.stderr)
    return _wait_and_save(client, edit, args.out, args.wait_timeout, args.quiet)


def _wait_and_save(client: Client, edit: Edit | str, out: Path | None, timeout: float | None, quiet: bool) -> int:
    edit_id = edit.id if isinstance(edit, Edit) else edit
    try:
        done = client.wait(edit, timeout=timeout, progress=StatusReporter(quiet))
    except KeyboardInterrupt:
        print(f"\ninterrupted; the edit keeps running. Cancel it with: editserve cancel {edit_id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if out is None:
        print(done.model_dump_json(indent=2))
        return EXIT_OK
    paths = client.download(done, out)
    if done.random_weights and not quiet:
        print("note: this model has random test weights, so the images are noise", file=sys.stderr)
    if not quiet:
        print(f"saved {len(paths)} file(s) to {out}", file=sys.stderr)
    for path in paths:
        print(path)
    return EXIT_OK


def cmd_get(client: Client, args: argparse.Namespace) -> int:
    print(client.get(args.id).model_dump_json(indent=2))
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    edit = client.cancel(args.id)
    note = " (stops at the next step)" if edit.cancel_requested and not edit.status.terminal else ""
    print(f"{edit.id} {edit.status.value}{note}")
    return EXIT_OK


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    return _wait_and_save(client, args.id, args.out, args.wait_timeout, args.quiet)


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    page = client.list(status=args.status, kind=args.kind, model=args.model, limit=args.limit)
    for edit in page.data:
        print(f"{edit.id}  {edit.kind:<4}  {edit.model:<12}  {edit.status.value:<10}  {edit.created_at.isoformat()}")
    return EXIT_OK


def cmd_models(client: Client, args: argparse.Namespace) -> int:
    rows = [("NAME", "KIND", "EDITS", "SIZE", "MAX", "NOTE")]
    for m in client.models():
        rows.append((m.name, m.kind, ",".join(m.edit_kinds), str(m.default_size), str(m.max_size),
                     "random test weights" if m.random_weights else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return EXIT_OK


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "edit": cmd_edit, "get": cmd_get, "cancel": cmd_cancel, "wait": cmd_wait, "list": cmd_list, "models": cmd_models,
    "dataset": cmd_dataset,
}


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"editserve: error: {message}", file=sys.stderr)
    return code


def _named_once(field: str | None, message: str) -> str:
    """``field: message`` unless the message already starts with the field's name."""
    if not field or message.startswith(f"{field}:") or message.startswith(f"{field} "):
        return message
    return f"{field}: {message}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.url, args.api_key, timeout=args.timeout, retries=args.retries) as client:
            return COMMANDS[args.command](client, args)
    except errors.InvalidRequestError as exc:
        return _fail(_named_once(exc.field, exc.message), EXIT_USAGE if exc.status is None else EXIT_REFUSED)
    except errors.EditFailed as exc:
        return _fail(str(exc), EXIT_FAILED)
    except errors.EditCanceled as exc:
        return _fail(str(exc), EXIT_CANCELED)
    except errors.WaitTimeout as exc:
        return _fail(f"{exc}; it keeps running (editserve wait {exc.edit.id if exc.edit else ''})", EXIT_TIMEOUT)
    except errors.APIError as exc:
        return _fail(f"{exc.status or ''} {exc.type}: {_named_once(exc.field, exc.message)}".lstrip(), EXIT_REFUSED)
    except errors.APIConnectionError as exc:
        return _fail(f"cannot reach the server: {exc}", EXIT_UNREACHABLE)
    except TimeoutError as exc:  # a dataset wait
        return _fail(str(exc), EXIT_TIMEOUT)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OSError as exc:
        return _fail(str(exc), EXIT_LOCAL_IO)


if __name__ == "__main__":
    sys.exit(main())
