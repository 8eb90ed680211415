"""Mutation testing of the editing core, the service's state layer and the SDK's webhook verification (mutmut).

Why per module: mutmut would otherwise run the whole suite for its coverage stats and for every mutant. Each
scoped module is mutated in a scratch copy of the tree with only its covering test files selected (MODULES),
so one module's run costs those files' time once for stats, once clean, then only the tests that reach the
mutated function per mutant. A wall-clock budget per module stops the run; mutants it did not reach are
reported as "not checked", never as killed.

    python3 bench/mutation.py                            # every module, default budgets
    python3 bench/mutation.py --modules service/limits.py editserve/webhooks.py --budget-s 600
    python3 bench/mutation.py --list                     # the module -> test files map

Writes ``bench/results/mutation-<machine>.json`` and ``.txt``: per module killed / survived / not covered /
not checked and the kill rate (killed ÷ checked), and every survivor with its diff and, where
``bench/mutation_notes.json`` has one, the reason it is left alone (equivalent mutant, or not worth a test).
Runs of some modules only merge into the existing result files (other modules' figures are kept).
mutmut only mutates code inside functions: Lua scripts and module-level tables (the transition table, the
GCRA script) are checked by the hand mutations listed in bench/README.md instead.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO))  # devtools/ (not installed) starts the shared Redis / S3 endpoint

from machine import cpu_model  # noqa: E402  (bench/ is the script's folder)

# module -> the test files that cover it (the per-mutant selection is narrowed further by mutmut's stats)
MODULES: dict[str, list[str]] = {
    "worker/editing/schedules.py": ["tests/test_p2p_conventions.py", "tests/test_p2p_controllers.py"],
    "worker/editing/words.py": ["tests/test_p2p_words.py", "tests/test_p2p_controllers.py"],
    "worker/editing/seq_aligner.py": ["tests/test_p2p_aligner.py", "tests/test_p2p_controllers.py"],
    "worker/editing/attention_maps.py": ["tests/test_attention_maps.py", "tests/test_attention_maps_mutants.py",
                                         "tests/test_p2p_controllers.py"],
    "worker/editing/controllers.py": ["tests/test_p2p_controllers.py", "tests/test_p2p_conventions.py",
                                      "tests/test_p2p_processor.py", "tests/test_controllers_mutants.py"],
    "worker/editing/processor.py": ["tests/test_p2p_processor.py"],
    "worker/editing/jobs.py": ["tests/test_editing_jobs.py", "tests/test_p2p_controllers.py"],
    # base and previews: unit tests on a fake model; the tiny-model and end-to-end tests that also reach them
    # (test_p2p_schedule_steps, test_non_square, test_previews' gateway runs) would run for every survivor
    "worker/editing/base.py": ["tests/test_base_mutants.py", "tests/test_editing_layers.py"],
    # the P2P state on a fake model plus one two-step tiny-sd run for the attention grids; test_p2p_properties
    # and test_p2p_samplers (diffusers parity, whole runs per mode) reach the same code at minutes per survivor
    "worker/editing/p2p.py": ["tests/test_p2p_mutants.py"],
    # the IP2P state on a fake model, and the guidance algebra; the parity tests against diffusers' pipeline
    # (test_ip2p.py's tiny-model runs, ~85 s) reach the same functions but would run for every survivor
    "worker/editing/ip2p.py": ["tests/test_ip2p_mutants.py", *(f"tests/test_ip2p.py::{t}" for t in (
        "test_guidance_is_affine_with_weights_summing_to_one", "test_guidance_special_cases",
        "test_guidance_on_x0_equals_guidance_on_eps", "test_chunk_order_golden", "test_per_cell_scales_broadcast"))],
    "worker/editing/batch.py": ["tests/test_batch_mutants.py", "tests/test_batch.py"],
    "worker/editing/previews.py": ["tests/test_previews_mutants.py",
                                   "tests/test_previews.py::test_latent_to_rgb_on_known_latents",
                                   "tests/test_previews.py::test_a_configured_tiny_decoder_makes_the_preview"],
    "worker/editing/methods.py": ["tests/test_editing_layers.py"],
    "worker/editing/buckets.py": ["tests/test_acceleration_mutants.py", "tests/test_step_acceleration.py"],
    "worker/editing/acceleration.py": ["tests/test_acceleration_mutants.py",
                                       "tests/test_step_acceleration.py"],
    # the whole-run equality file (test_p2p_tensor_controller.py) takes minutes per mutant: these unit tests
    # compare the same controllers call for call on synthetic tensors
    "worker/editing/tensor_controller.py": ["tests/test_tensor_controller_mutants.py"],
    "worker/editing/continuous.py": ["tests/test_continuous_mutants.py", "tests/test_continuous_core.py"],
    # the runner on a stub model against the null-text reference loop restated; test_inversion.py (tiny-sd-smooth
    # round trips, ~200 s) reaches the same code but would run for every survivor
    "worker/editing/inversion.py": ["tests/test_inversion_mutants.py"],
    "service/jobstore.py": ["tests/test_jobstore.py", "tests/test_terminal_states.py",
                            "tests/test_idempotency_image.py", "tests/test_jobstore_mutants.py"],
    "service/limits.py": ["tests/test_limits.py", "tests/test_rate_limit_clock.py", "tests/test_limits_mutants.py"],
    # not test_webhooks_delivery.py / the rest of test_image_url.py: end to end (gateway, worker, delivery process),
    # ~40 s per surviving mutant here; egress's rules and the fetch path are checked directly by the tests below
    "service/egress.py": ["tests/test_egress_rules.py", "tests/test_egress_mutants.py",
                          "tests/test_image_url.py::test_a_name_is_resolved_once_checked_and_pinned_with_its_sni",
                          "tests/test_image_url.py::test_the_default_async_client_trusts_only_the_system_store"],
    "service/storage.py": ["tests/test_storage.py", "tests/test_storage_mutants.py"],
    "editserve/webhooks.py": ["tests/test_webhooks_signing.py", "tests/test_webhooks_verify_edges.py",
                              "tests/test_webhooks_mutants.py"],
}
# modules whose tests load the tiny models per test module: the fork server loads them once (mutation_plugin.py)
PRELOAD: dict[str, list[str]] = {m: ["tiny-sd"] for m in (
    "worker/editing/processor.py", "worker/editing/p2p.py",
    "worker/editing/batch.py", "worker/editing/continuous.py", "worker/editing/acceleration.py",
    "worker/editing/buckets.py")}
# modules whose tests need a Redis / an S3 endpoint: one per module run, shared by its mutants
SERVICES: dict[str, list[str]] = {"service/jobstore.py": ["redis", "s3"], "service/limits.py": ["redis", "s3"],
                                  "service/storage.py": ["s3"]}
DEFAULT_BUDGET_S = {path: 900 for path in MODULES} | {path: 1800 for path in (
    "worker/editing/batch.py", "worker/editing/controllers.py", "worker/editing/inversion.py", "service/jobstore.py")}
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault",
          None: "not checked"}
NOTES = REPO / "bench" / "mutation_notes.json"


def load_notes() -> dict[str, str]:
    """Every bench/mutation_notes*.json merged (one file per group of modules, to keep merges apart)."""
    notes: dict[str, str] = {}
    for path in sorted(NOTES.parent.glob("mutation_notes*.json")):
        notes.update(json.loads(path.read_text()))
    return notes


def mutmut_command() -> list[str]:
    script = shutil.which("mutmut")
    return [script] if script else [sys.executable, "-m", "mutmut"]


def scratch_dir(module: str, root: Path) -> Path:
    return root / module.replace("/", "_").removesuffix(".py")


def scratch_tree(module: str, tests: list[str], root: Path) -> Path:
    """A copy of the packages and tests with a [tool.mutmut] section selecting ``module`` and ``tests``."""
    work = scratch_dir(module, root)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("editserve", "service", "worker", "tests", "bench", "devtools"):
        shutil.copytree(REPO / package, work / package, ignore=ignore)
    config = "\n".join([
        "", "[tool.mutmut]",
        'source_paths = ["editserve", "service", "worker"]',
        'also_copy = ["devtools"]',  # the test fixtures start servers through devtools.devstack
        f"only_mutate = {json.dumps([module])}",
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:unraisableexception", "-q"]',
        'process_isolation = "forkserver"',  # torch is not fork-safe once used
        "use_setproctitle = false",
        # generous CPU limits: a per-test estimate misses fixture setup (tokenizer, models), and a mutant
        # killed by the limit would count as killed; real endless loops are rare among these mutants
        "timeout_multiplier = 10.0",
        "timeout_constant = 60.0",
        "use_git_change_detection = false",
        "",
    ])
    # the speed-ups of bench/mutation_plugin.py (one tokenizer, frozen heap, optionally preloaded models)
    shutil.copy(REPO / "bench" / "mutation_plugin.py", work / "tests" / "mutation_plugin.py")
    with (work / "tests" / "conftest.py").open("a") as conftest:
        conftest.write("\nfrom mutation_plugin import *  # noqa: E402,F401,F403  (bench/mutation.py)\n")
    (work / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text() + config)
    return work


def run_module(module: str, tests: list[str], budget_s: float, root: Path, children: int,
               resume: bool = False) -> dict:
    """One module's mutmut run; ``resume`` continues a stopped run in its scratch tree (same code and tests,
    mutmut keeps the verdicts it has) instead of starting over."""
    work = scratch_dir(module, root)
    resumed = resume and (work / "mutants" / f"{module}.meta").exists()
    if not resumed:
        work = scratch_tree(module, tests, root)
    env = dict(os.environ, EDITSERVE_MODELS_DIR=str(REPO / ".models"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               EDITSERVE_WORKER__TORCH_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               EDITSERVE_MUTATION_PRELOAD=",".join(PRELOAD.get(module, [])),
               EDITSERVE_MUTATION_TESTS=",".join(tests))
    servers = []
    if module in SERVICES:  # one Redis / S3 endpoint for all mutants of this module (mutation_plugin.py)
        from devtools.devstack import ensure_redis, free_port, start_seaweedfs

        if "redis" in SERVICES[module]:
            port = free_port()
            redis_dir = root / f"redis-{port}"
            redis_dir.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--databases", "32", "--dir", str(redis_dir)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers.append(ensure_redis(f"redis://127.0.0.1:{port}/0"))
            servers[-1].process = proc
            env["EDITSERVE_MUTATION_REDIS"] = f"redis://127.0.0.1:{port}"
        if "s3" in SERVICES[module]:
            s3 = start_seaweedfs(bucket="editserve-test")
            servers.append(s3)
            env["EDITSERVE_MUTATION_S3"] = json.dumps({k: getattr(s3, k) for k in (
                "endpoint_url", "access_key", "secret_key", "bucket", "region")})
    log_path = work / "mutmut.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*mutmut_command(), "run", "--max-children", str(children)], cwd=work, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=budget_s)
            stopped = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)  # mutmut saves each verdict as it comes; let it shut down
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            stopped = True
    elapsed = time.monotonic() - started
    for server in servers:
        server.stop()
    result = summarise(module, tests, work, elapsed, stopped, proc.returncode, log_path)
    result["ended"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if resumed:
        result["ended"] += " (a stopped run resumed in its scratch tree; elapsed is the resumed part)"
    return result


def summarise(module: str, tests: list[str], work: Path, elapsed: float, stopped: bool, returncode: int,
              log_path: Path) -> dict:
    meta_path = work / "mutants" / f"{module}.meta"
    codes: dict[str, int | None] = {}
    if meta_path.exists():
        codes = json.loads(meta_path.read_text()).get("exit_code_by_key", {})
    counts: dict[str, int] = {}
    for code in codes.values():
        status = STATUS.get(code, "suspicious")
        counts[status] = counts.get(status, 0) + 1
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    checked = sum(n for status, n in counts.items() if status not in ("not checked", "skipped"))
    notes = load_notes()
    survivors = []
    mutated = work / "mutants" / module
    functions = functions_of(mutated) if mutated.exists() else {}
    for name, code in sorted(codes.items()):
        status = STATUS.get(code, "suspicious")
        if status in ("survived", "no tests", "suspicious", "segfault"):
            survivors.append({"mutant": name, "status": status, "diff": mutant_diff(functions, module, name),
                              "note": notes.get(name, "UNEXPLAINED")})
    tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
    return {"module": module, "tests": tests, "mutants": len(codes), "counts": counts, "killed": killed,
            "checked": checked, "kill_rate": round(killed / checked, 4) if checked else None,
            "complete": not stopped and counts.get("not checked", 0) == 0 and returncode == 0,
            "elapsed_s": round(elapsed, 1), "mutmut_exit": returncode, "survivors": survivors,
            "log_tail": tail if returncode not in (0, None) and not codes else ""}


def functions_of(mutated: Path) -> dict[str, str]:
    """Every function in mutmut's mutated copy of a module (originals and mutants, methods included), by name."""
    source = mutated.read_text()
    lines = source.splitlines()
    # cut by line numbers: ast.get_source_segment re-splits the whole file per call (minutes on a 1 MB module)
    return {node.name: "\n".join(lines[node.lineno - 1:node.end_lineno]) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def mutant_diff(functions: dict[str, str], module: str, key: str) -> str:
    """The changed lines of one mutant against its original (``mutmut show`` is one process per mutant)."""
    name = key[len(module.removesuffix(".py").replace("/", ".")) + 1:]
    original = name.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"
    before = functions.get(original, "").replace(original, "f").splitlines()
    after = functions.get(name, "").replace(name, "f").splitlines()
    return "\n".join(line for line in difflib.unified_diff(before, after, lineterm="", n=0)
                     if line[:1] in "+-" and line[:3] not in ("---", "+++"))


def write_results(results: dict[str, dict], out: Path, machine: str, started: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, txt_path = out.with_suffix(".json"), out.with_suffix(".txt")
    merged: dict[str, dict] = {}
    if json_path.exists():
        merged = {m["module"]: m for m in json.loads(json_path.read_text()).get("modules", [])}
    merged.update(results)
    ordered = [merged[m] for m in MODULES if m in merged]
    json_path.write_text(json.dumps({"machine": machine, "tool": "mutmut 3.8.1", "updated": started,
                                     "modules": ordered}, indent=1) + "\n")
    lines = [f"mutation testing (mutmut), {machine}, updated {started}", "",
             f"{'module':36} {'mutants':>7} {'killed':>6} {'t/out':>5} {'surv.':>5} {'no test':>7} {'unrun':>5} "
             f"{'rate':>7}  run"]
    for m in ordered:
        c = m["counts"]
        rate = f"{100 * m['kill_rate']:.1f}%" if m["kill_rate"] is not None else "-"
        lines.append(f"{m['module']:36} {m['mutants']:7d} {m['killed']:6d} {c.get('timeout', 0):5d} "
                     f"{c.get('survived', 0):5d} "
                     f"{c.get('no tests', 0):7d} {c.get('not checked', 0):5d} {rate:>7}  "
                     f"{'complete' if m['complete'] else 'PARTIAL'} in {m['elapsed_s']:.0f} s"
                     + (f", ended {m['ended']}" if m.get("ended") else ""))
    lines.append("")
    lines.append("killed includes t/out (the CPU limit); kill rate = killed / checked; 'unrun' = not reached "
                 "within the module's budget")
    for m in ordered:
        if not m["survivors"]:
            continue
        lines += ["", f"== survivors in {m['module']} ({len(m['survivors'])})"]
        for s in m["survivors"]:
            lines.append(f"- {s['mutant']} [{s['status']}]: {s['note']}")
            lines += [f"    {d}" for d in s["diff"].splitlines()]
    txt_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(ordered) + 5]))
    print(f"wrote {json_path} and {txt_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="*", default=list(MODULES), help="paths from MODULES (default: all)")
    parser.add_argument("--budget-s", type=float, help="wall-clock budget per module (default: per-module table)")
    parser.add_argument("--children", type=int, default=1, help="mutants run at once (default 1: a shared box)")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "editserve-mutation")
    parser.add_argument("--out", type=Path, help="results path without suffix (default bench/results/mutation-MACHINE)")
    parser.add_argument("--machine", help="name in the result files (default: CPU vendor, family and core count)")
    parser.add_argument("--list", action="store_true", help="print the module -> test files map and exit")
    parser.add_argument("--renote", action="store_true",
                        help="re-apply mutation_notes.json to the existing results (no run) and rewrite them")
    parser.add_argument("--resume", action="store_true",
                        help="continue a module's stopped run in its scratch tree under --workdir "
                             "(its verdicts are kept)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="merge the modules of other runs' result files (--out of parallel runs) into the "
                             "results, re-applying the notes (no run)")
    args = parser.parse_args()
    if args.list:
        for module, tests in MODULES.items():
            print(f"{module}: {' '.join(tests)}")
        return
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"not in the scoped modules: {unknown}")
    machine = args.machine or re.sub(r"[^a-z0-9]+", "-", " ".join(cpu_model().split()[:2]).lower()) + \
        f"-{os.cpu_count()}c"
    out = args.out or REPO / "bench" / "results" / f"mutation-{machine}"
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.renote or args.merge:
        notes = load_notes()
        saved = json.loads(out.with_suffix(".json").read_text())
        modules = {m["module"]: m for m in saved["modules"]}
        for other in args.merge or []:
            modules |= {m["module"]: m for m in json.loads(other.read_text())["modules"]}
        for m in modules.values():
            for survivor in m["survivors"]:
                survivor["note"] = notes.get(survivor["mutant"], "UNEXPLAINED")
        write_results(modules, out, machine, started if args.merge else saved["updated"])
        return
    results = {}
    for module in args.modules:
        budget = args.budget_s or DEFAULT_BUDGET_S[module]
        print(f"{module}: mutating, tests {' '.join(MODULES[module])}, budget {budget:.0f} s", flush=True)
        results[module] = run_module(module, MODULES[module], budget, args.workdir, args.children, args.resume)
        r = results[module]
        print(f"  {r['killed']}/{r['checked']} killed, {r['counts']}, {r['elapsed_s']} s", flush=True)
        write_results(results, out, machine, started)


if __name__ == "__main__":
    main()
