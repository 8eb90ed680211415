"""The editing core's layering: the base knows no method, methods import only the base, one table picks them.

Walks every import of each module, function bodies included (an import hidden inside a function is still a
dependency), so a method that reached back into the batch or the runner fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from worker.editing.methods import BY_KIND, BY_MODEL_KIND, METHODS, method_for, method_of_spec
from worker.runtime.execute import SPEC_BUILDERS

EDITING = Path(__file__).resolve().parent.parent / "worker" / "editing"
METHOD_MODULES = ("p2p", "ip2p")
ABOVE_METHODS = {"worker.editing.batch", "worker.editing.methods"}


def imported_modules(module: str) -> set[str]:
    tree = ast.parse((EDITING / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("worker.")}


def test_the_base_imports_no_method_and_nothing_above_them():
    forbidden = ABOVE_METHODS | {f"worker.editing.{m}" for m in METHOD_MODULES}
    assert not imported_modules("base") & forbidden


@pytest.mark.parametrize("module", METHOD_MODULES)
def test_a_method_imports_the_base_not_the_batch_nor_another_method(module):
    imports = imported_modules(module)
    assert "worker.editing.base" in imports
    others = {f"worker.editing.{m}" for m in METHOD_MODULES if m != module}
    assert not imports & (ABOVE_METHODS | others)


def test_one_row_per_edit_kind_and_per_model_kind_each_with_a_payload_translation():
    assert len(BY_KIND) == len(BY_MODEL_KIND) == len(METHODS)
    assert set(SPEC_BUILDERS) == set(BY_KIND)


def test_the_runner_refuses_a_spec_of_another_method_naming_the_model_field():
    from worker.editing.base import JobState
    from worker.editing.jobs import EditValidationError, IP2PJobSpec, P2PJobSpec

    p2p = P2PJobSpec("j", "a cat", ["a dog"], seed=1)
    ip2p = IP2PJobSpec("k", image=None, instruction="x", cells=[])
    assert method_for("text2image", p2p).kind == "p2p"
    assert method_of_spec(ip2p).model_kind == "instruct"
    assert all(issubclass(m.state, JobState) for m in METHODS)
    with pytest.raises(EditValidationError) as caught:
        method_for("instruct", p2p, "tiny-ip2p")
    assert caught.value.message == "model 'tiny-ip2p' (instruct) cannot run a P2PJobSpec"
    with pytest.raises(EditValidationError) as caught:
        method_for("upscaler", ip2p, "x4")  # a model kind no method runs
    assert caught.value.field == "model" and caught.value.message == "model 'x4' (upscaler) cannot run a IP2PJobSpec"


def test_a_spec_of_no_method_is_a_type_error_naming_its_type():
    """A programming error (a spec type without a row in METHODS), not a client's: TypeError, not a 4xx."""
    with pytest.raises(TypeError, match=r"^no edit method takes a dict$"):
        method_of_spec({})
