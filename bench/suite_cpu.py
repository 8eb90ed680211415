"""A pytest plugin that writes each test's wall and CPU seconds per phase (setup/call/teardown) as it runs.

Why CPU seconds: on a box shared with other runs, wall time says more about the neighbours than about the
test; CPU seconds (this process plus the subprocesses it has waited for: workers, gateways, redis, node)
compare across runs. Rows are appended as each phase ends, so a run stopped half-way still tells where its
time went.

    PYTHONPATH=bench python3 -m pytest -q -p no:cacheprovider -p suite_cpu tests/test_schedulers.py
    sort -t$'\\t' -k5 -rn .run/suite-cpu.tsv | head -20     # nodeid, phase, outcome, wall s, cpu s

``EDITSERVE_SUITE_CPU_LOG`` names another file.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

_LOG_PATH = Path(os.environ.get("EDITSERVE_SUITE_CPU_LOG", Path(__file__).resolve().parent.parent / ".run" /
                                "suite-cpu.tsv"))
_started: dict[str, tuple[float, float]] = {}
_log: list = []


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pytest_sessionstart(session) -> None:
    _LOG_PATH.parent.mkdir(parents=True, exist_ok=True)
    _log.append(_LOG_PATH.open("a", buffering=1))


def pytest_sessionfinish(session) -> None:
    while _log:
        _log.pop().close()


def pytest_runtest_setup(item) -> None:
    _started[item.nodeid] = (time.monotonic(), _cpu_seconds())


def pytest_runtest_logreport(report) -> None:
    started = _started.get(report.nodeid)
    if started is None or not _log:
        return
    now, cpu = time.monotonic(), _cpu_seconds()
    fields = (report.nodeid, report.when, report.outcome, f"{now - started[0]:.2f}", f"{cpu - started[1]:.2f}")
    _log[-1].write("\t".join(fields) + "\n")
    _started[report.nodeid] = (now, cpu)
