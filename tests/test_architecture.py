"""The layer rules of docs/architecture.md, checked on the code itself.

Every module of ``editserve/``, ``service/`` and ``worker/`` is parsed (never imported) and ALL its imports are
collected: module level, inside functions and methods, under ``if TYPE_CHECKING``, and
``importlib.import_module("...")`` / ``__import__("...")`` string literals. The import graph must have no cycle
(a cycle is reported by name), and the layers must only point down. The gateway's no-torch rule is checked
twice: statically here for every module, and at run time (importing the app and counting tokens), because
a third-party package can pull torch in without our code naming it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("editserve", "service", "worker")
TORCH_FAMILY = ("torch", "diffusers", "accelerate", "safetensors", "torchvision")


# ---------------------------------------------------------------------------------------------- the graph

def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


def _literal_imports(node: ast.Call) -> Iterable[str]:
    """``importlib.import_module("x")``, ``import_module("x")``, ``__import__("x")`` with a literal name."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name in ("import_module", "__import__") and node.args:
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            yield first.value


def _imports(path: Path, module: str) -> Iterable[tuple[str, list[str]]]:
    """(module, names imported from it) for every import anywhere in the file; ``import a.b`` gives (a.b, [])."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, [alias.name for alias in node.names]
        elif isinstance(node, ast.Call):
            for name in _literal_imports(node):
                yield name, []


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name ``path`` imports, anywhere in the file (``from a import b`` gives ``a`` and ``a.b``)."""
    names: set[str] = set()
    for base, members in _imports(path, module):
        names.add(base)
        names.update(f"{base}.{m}" for m in members)
    return names


def import_graph() -> dict[str, set[str]]:
    """module → the modules of ours it imports. ``from pkg import mod`` points at ``pkg.mod`` when that is a
    module, else at ``pkg``; parent packages are not added (their ``__init__`` is checked as a module itself)."""
    modules = our_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str] = set()
        for base, members in _imports(path, module):
            submodules = [f"{base}.{m}" for m in members if f"{base}.{m}" in modules]
            targets.update(submodules)
            if base in modules and (not members or len(submodules) < len(members)):
                targets.add(base)
        targets.discard(module)
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(the modules of a strongly connected component, one concrete cycle through them) for every component
    of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [(component, _cycle_in(component, graph)) for component in components]


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A path start → ... → start inside one strongly connected component (breadth first: a shortest one)."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def imports_of(prefix: str) -> dict[str, set[str]]:
    """Every module under ``prefix`` → every dotted name it imports (ours and third-party)."""
    return {m: imported_names(p, m) for m, p in our_modules().items() if m == prefix or m.startswith(prefix + ".")}


def offenders(prefix: str, forbidden: Iterable[str]) -> list[str]:
    bad = tuple(forbidden)
    return sorted(f"{m} imports {n}" for m, names in imports_of(prefix).items() for n in names
                  if any(n == f or n.startswith(f + ".") for f in bad))


# ---------------------------------------------------------------------------------------------- the tests

def test_the_walker_sees_imports_everywhere(tmp_path):
    """The checks below are only as good as this: function bodies, relative imports and importlib strings."""
    source = (
        "import importlib\n"
        "from . import sibling\n"
        "def f():\n"
        "    from service.jobstore import JobStore\n"
        "    importlib.import_module('service.webhooks')\n"
        "class C:\n"
        "    def m(self):\n"
        "        import worker.runtime.reaper\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(source)
    names = imported_names(path, "service.probe")
    assert {"service.sibling", "service.jobstore", "service.jobstore.JobStore", "service.webhooks",
            "worker.runtime.reaper", "importlib"} <= names
    cycle = find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycle == [(["a", "b", "c"], ["a", "b", "c", "a"])]


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "service.jobstore" in graph and "worker.runtime.worker" in graph  # the walk found the packages
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(
        f"{' -> '.join(path)} (modules in the loop: {', '.join(members)})" for members, path in cycles)


def test_the_contract_and_sdk_import_neither_the_service_nor_the_worker():
    assert offenders("editserve", ["service", "worker", *TORCH_FAMILY]) == []


def test_the_gateway_layer_never_imports_torch_or_the_worker():
    assert offenders("service", ["worker", *TORCH_FAMILY]) == []


def test_state_modules_never_import_what_watches_them():
    """Keys, scripts, records, transitions, admission and the read view own state; the webhooks, the app,
    the streams and the admin CLI watch or serve it (they are handed to JobStore as listeners)."""
    watchers = ["service.webhooks", "service.app", "service.streams", "service.admin"]
    for state in ("service.keys", "service.scripts", "service.jobstore", "service.editview", "service.limits",
                  "service.queues", "service.auth", "service.storage", "service.metrics", "service.config"):
        assert offenders(state, watchers) == [], state


def test_keys_and_scripts_are_leaves():
    """Every layer may use them, so they may use almost nothing."""
    graph = import_graph()
    assert graph["service.keys"] == set()
    assert graph["service.scripts"] <= {"service.keys", "service.config", "service.queues", "editserve.contract"}


LEAVES = {"service.keys", "service.scripts", "service.queues", "service.config", "service.storage", "service.metrics",
          "service.egress", "service.imaging"}


def test_leaves_import_only_leaves_and_the_contract():
    graph = import_graph()
    for leaf in sorted(LEAVES):
        above = {m for m in graph[leaf] if not (m in LEAVES or m.startswith("editserve."))}
        assert above == set(), f"{leaf} imports {sorted(above)}"


def test_the_worker_runtime_does_not_import_the_gateway():
    assert offenders("worker.runtime", ["service.app", "service.streams", "service.admin", "service.intake",
                                        "service.edit_validation", "fastapi"]) == []


def test_webhook_emission_is_redis_only():
    """``service.webhooks.emit`` is what a GPU worker runs on every status change: no HTTP client, no sender."""
    assert offenders("service.webhooks.emit", ["httpx", "service.webhooks.delivery", "service.webhooks.sender",
                                               "service.webhooks.failed", "service.egress"]) == []
    assert offenders("service.webhooks.events", ["httpx", "service.webhooks.delivery", "service.webhooks.emit",
                                                 "service.webhooks.failed", "service.webhooks.sender"]) == []


def test_the_editing_core_knows_no_service():
    """worker/editing is plain library code: no Redis, RQ, HTTP or service module (``on_step`` its way out)."""
    assert offenders("worker.editing", ["service", "worker.runtime", "redis", "rq", "httpx", "fastapi"]) == []


def test_nothing_shipped_imports_the_dev_tools():
    for package in PACKAGES:
        assert offenders(package, ["devtools"]) == []


def test_gateway_import_and_prompt_validation_do_not_import_torch():
    """At run time too: a third-party import could pull torch in without our code naming it."""
    code = (
        "import sys\n"
        "import service.app\n"
        "assert 'torch' not in sys.modules, 'importing service.app imported torch'\n"
        "import service.imaging\n"
        "assert 'torch' not in sys.modules, 'importing service.imaging imported torch'\n"
        "from service.config import Settings\n"
        "from service.prompt_tokens import PromptTokenCounter\n"
        "settings = Settings()\n"
        "counter = PromptTokenCounter(settings)\n"
        "for name in ('tiny-sd', 'tiny-ip2p'):\n"
        "    count = counter.count(settings.model_catalog()[name], 'a photo of a cat riding a bike')\n"
        "    print(name, count.method, count.tokens)\n"
        "assert 'torch' not in sys.modules, 'loading the CLIP tokenizer imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # the real CLIP BPE: 8 words + start/end = 10 tokens, when the tiny models' tokenizer folders exist
    for line in result.stdout.splitlines():
        name, method, tokens = line.split()
        assert method in ("clip", "tokenizers", "lower-bound")
        if method != "lower-bound":
            assert tokens == "10"
