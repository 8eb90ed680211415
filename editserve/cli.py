"""The ``editserve`` command: submit P2P / IP2P edits, follow them, save the images.

    editserve edit p2p --source "a cat on a bike" --target "a dog on a bike" --out out/
    editserve edit ip2p --image cat.png --instruction "make it a watercolor" --sweep-image 1,1.5 --out out/
    editserve get ID | editserve cancel ID | editserve wait ID --out out/ | editserve list | editserve models
    editserve invert photo.jpg --caption "a cat on a mat" --out out/    # prints the inversion id first
    editserve edit p2p --inversion ID --target "a dog on a mat" --out out/

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
from editserve.contract import INVERSION_METHODS, SCHEDULERS, Edit, EditStatus, ErrorType, Inversion, LocalBlend, Sweep
from editserve.kinds import EDIT_KINDS
from editserve.dataset_cli import add_dataset_parser, cmd_dataset
from editserve.progress import ProgressLine, label

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
EXIT_CODES_HELP = ("exit codes: 0 ok, 1 edit or inversion failed, 2 usage or invalid request, 3 wait timed out, "
                   "4 edit or inversion canceled, "
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
    parser.add_argument("--num-outputs", type=int, metavar="N",
                        help="outputs per request, from seeds seed, seed+1, ... (P2P: a source and its targets each)")
    parser.add_argument("--seeds", type=_ints, metavar="N,N", help="explicit seeds, one output each, e.g. 1,2")
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
    p2p.add_argument("--source", help="the source prompt (with --inversion: the photo's caption by default)")
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
    p2p.add_argument("--inversion", metavar="ID", help="edit a real photo: a finished inversion from `editserve "
                     "invert` (source prompt, model, size, steps, sampler and guidance default to the inversion's)")
    _add_common_edit_options(p2p)

    ip2p = kinds.add_parser("ip2p", help="InstructPix2Pix: edit an image by a written instruction")
    source = ip2p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="input image file")
    source.add_argument("--image-url", metavar="URL", help="input image by https URL (the server fetches it)")
    ip2p.add_argument("--instruction", required=True, help='e.g. "turn it into a watercolor"')
    ip2p.add_argument("--text-guidance", type=float, help="text guidance s_T (7.5)")
    ip2p.add_argument("--image-guidance", type=float, help="image guidance s_I (1.5)")
    ip2p.add_argument("--resolution", type=int, help="long side of the resized input (512)")
    ip2p.add_argument("--sweep-image", type=_floats, metavar="F,F", help="grid over image guidance, e.g. 1,1.5")
    ip2p.add_argument("--sweep-text", type=_floats, metavar="F,F", help="grid over text guidance, e.g. 5,7.5")
    ip2p.add_argument("--sweep-seeds", type=_ints, metavar="N,N", help="grid over seeds, e.g. 1,2")
    ip2p.add_argument("--output-size", choices=["model", "input"],
                      help="model: the official resize the model ran at (default); input: back at the input's size")
    _add_common_edit_options(ip2p)

    invert = commands.add_parser("invert", help="invert a photo so P2P can edit it (prints the inversion id)",
                                 epilog="then: editserve edit p2p --inversion ID --target '...' --out DIR")
    invert.add_argument("image", type=Path, help="the photo (png, jpeg, webp)")
    invert.add_argument("--caption", required=True, help="what the photo shows: the source prompt of its edits")
    invert.add_argument("--method", choices=list(INVERSION_METHODS), help="null-text (default; the reference), "
                        "ddim (inversion only) or negative-prompt (no optimisation, DDIM cost)")
    invert.add_argument("--model", help="text2image model (default: the P2P default)")
    invert.add_argument("--steps", type=int, help="DDIM steps; edits from it use the same count")
    invert.add_argument("--guidance", type=float, help="guidance the edits will use (7.5)")
    invert.add_argument("--inner-steps", type=int, metavar="N", help="null-text: optimiser iterations per step (10)")
    invert.add_argument("--early-stop", type=float, metavar="EPS", help="null-text: early-stop loss (1e-5)")
    invert.add_argument("--resolution", type=int, help="side of the centre-cropped square (512, capped per model)")
    invert.add_argument("--webhook", metavar="URL", help="POST signed events to this URL")
    invert.add_argument("--out", type=Path, help="folder for the reconstruction ({id}-reconstruction.png)")
    invert.add_argument("--arrays", action="store_true", help="with --out: also save x_T and the per-step "
                        "embeddings ({id}-inversion.safetensors)")
    invert.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                        help="wait for it, showing DDIM steps and inner iterations (default); --no-wait prints "
                             "the id and returns")
    invert.add_argument("--wait-timeout", type=float, metavar="S", help="give up waiting after S seconds")

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
    get_inv = commands.add_parser("get-inversion", help="show an inversion as JSON")
    get_inv.add_argument("id")
    cancel_inv = commands.add_parser("cancel-inversion", help="cancel an inversion")
    cancel_inv.add_argument("id")
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
            print(f"{label(edit, full_id=True)} {edit.status.value}", file=sys.stderr)
        self.last_status = edit.status


class InversionReporter:
    """Inversion progress to stderr: a live line on a terminal, else one line per status or step change."""

    def __init__(self, quiet: bool):
        self.bar = ProgressLine() if not quiet else None
        self.last: tuple | None = None

    def __call__(self, inversion: Inversion) -> None:
        if self.bar is None:
            return
        if self.bar.enabled:
            self.bar(inversion)
            return
        progress = inversion.progress
        key = (inversion.status, progress.phase if progress else None, progress.step if progress else None)
        if key == self.last:
            return
        self.last = key
        line = f"{inversion.id} {inversion.status.value}"
        if progress is not None and progress.total and not inversion.status.terminal:
            line += f" {progress.phase or ''} step {progress.step}/{progress.total}".replace("  ", " ")
            if progress.inner_total:
                line += f" inner {progress.inner_iterations}/{progress.inner_total}"
        print(line, file=sys.stderr)


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
                sweep=sweep, output_size=args.output_size)


def cmd_edit(client: Client, args: argparse.Namespace) -> int:
    if not args.no_wait and args.out is None:
        raise errors.InvalidRequestError("--out DIR is required (or pass --no-wait)", type=ErrorType.usage.value, field="--out")
    common = dict(steps=args.steps, model=args.model, seed=args.seed, webhook=args.webhook, priority=args.priority,
                  scheduler=args.scheduler, num_outputs=args.num_outputs, seeds=args.seeds)
    if args.negative:
        common["negative_prompt"] = args.negative
    common.update({k: v for k in ("output_format", "output_quality", "preview_every")
                   if (v := getattr(args, k)) is not None})
    if args.kind == "p2p":
        source = args.source
        if not source and not args.inversion:
            raise errors.InvalidRequestError("--source is required (or --inversion ID)", type=ErrorType.usage.value,
                                             field="--source")
        if not source:
            source = _caption_of(client, args.inversion)
        edit = client.submit_p2p(source, args.target, inversion=args.inversion, **common, **_p2p_fields(args))
    else:
        if args.image_url is not None:
            common["image_url"] = args.image_url
        elif not args.image.is_file():
            raise errors.InvalidRequestError(f"no such file: {args.image}", type=ErrorType.usage.value, field="--image")
        edit = client.submit_ip2p(args.image, args.instruction, **common, **_ip2p_fields(args))
    if args.no_wait:
        print(edit.id)
        return EXIT_OK
    if not args.quiet:
        print(f"submitted {edit.id} ({edit.kind}, model {edit.model})", file=sys.stderr)
    return _wait_and_save(client, edit, args.out, args.wait_timeout, args.quiet)


def _caption_of(client: Client, inversion_id: str) -> str:
    """The inverted photo's caption: the source prompt of an edit from it (the server takes the inversion's model,
    size, steps, sampler and guidance itself when the command line leaves them out)."""
    return client.get_inversion(inversion_id).request.get("caption") or ""


def cmd_invert(client: Client, args: argparse.Namespace) -> int:
    if not args.image.is_file():
        raise errors.InvalidRequestError(f"no such file: {args.image}", type=ErrorType.usage.value, field="IMAGE")
    if args.out is not None and not args.wait:
        raise errors.InvalidRequestError("--out needs --wait (the reconstruction exists once it finished)",
                                         type=ErrorType.usage.value, field="--out")
    fields = dict(model=args.model, method=args.method, steps=args.steps, guidance_scale=args.guidance,
                  num_inner_steps=args.inner_steps, early_stop_epsilon=args.early_stop, resolution=args.resolution,
                  webhook=args.webhook)
    inversion = client.invert(args.image, args.caption, **fields)
    print(inversion.id, flush=True)
    if not args.wait:
        return EXIT_OK
    if not args.quiet:
        print(f"inverting {inversion.id} ({inversion.request.get('method')}, model {inversion.request.get('model')})",
              file=sys.stderr)
    try:
        done = client.wait_inversion(inversion, timeout=args.wait_timeout, progress=InversionReporter(args.quiet))
    except KeyboardInterrupt:
        print(f"\ninterrupted; the inversion keeps running (editserve get-inversion {inversion.id})", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.quiet and done.reconstruction_error is not None:
        print(f"reconstruction error (latent MSE): {done.reconstruction_error:.4g}", file=sys.stderr)
    if args.out is not None:
        paths = client.download_inversion(done, args.out, arrays=args.arrays)
        for path in paths:
            print(path)
    if not args.quiet:
        print(f"edit it: editserve edit p2p --inversion {done.id} --target '...' --out DIR", file=sys.stderr)
    return EXIT_OK


def cmd_get_inversion(client: Client, args: argparse.Namespace) -> int:
    print(client.get_inversion(args.id).model_dump_json(indent=2))
    return EXIT_OK


def cmd_cancel_inversion(client: Client, args: argparse.Namespace) -> int:
    inversion = client.cancel_inversion(args.id)
    print(f"{inversion.id} {inversion.status.value}")
    return EXIT_OK


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
    rows = [("NAME", "KIND", "EDITS", "SIZE", "MAX", "WORKERS", "QUEUED", "EDITS/MIN", "NOTE")]
    for m in client.models():
        notes = ["random test weights"] * m.random_weights + ["refused without a worker"] * m.require_live_worker
        rate = f"{m.throughput.edits_per_minute:g}" if m.throughput else "-"
        rows.append((m.name, m.kind, ",".join(m.edit_kinds), str(m.default_size), str(m.max_size), str(m.workers),
                     str(m.queued), rate, "; ".join(notes)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return EXIT_OK


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "edit": cmd_edit, "get": cmd_get, "cancel": cmd_cancel, "wait": cmd_wait, "list": cmd_list, "models": cmd_models,
    "dataset": cmd_dataset, "invert": cmd_invert, "get-inversion": cmd_get_inversion,
    "cancel-inversion": cmd_cancel_inversion,
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
        again = ("editserve get-inversion" if isinstance(exc.edit, Inversion) else "editserve wait")
        return _fail(f"{exc}; it keeps running ({again} {exc.edit.id if exc.edit else ''})", EXIT_TIMEOUT)
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
