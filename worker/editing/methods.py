"""The one table of edit methods: which edit kind runs on which kind of model, with which spec and state.

Why a table above the methods: ``base`` must not know its subclasses, and the runner must not grow an
``if`` per method. Adding a method = its spec in ``jobs``, its ``JobState`` subclass in its own module
(importing only ``base``), and one row here; the worker runtime translates a queued request into the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.editing.base import JobState
from worker.editing.ip2p import IP2PJobState
from worker.editing.jobs import EditValidationError, IP2PJobSpec, JobSpec, P2PJobSpec
from worker.editing.p2p import P2PJobState


@dataclass(frozen=True)
class EditMethod:
    """One edit method: its contract tag, the model kind that runs it, its job spec and its per-job state."""

    kind: str  # the HTTP contract's edit kind ("p2p")
    model_kind: str  # ModelSpec.kind of the models that run it ("text2image")
    spec: type  # the editing core's job spec (P2PJobSpec)
    state: type[JobState]  # builds a job's state: ``state.create(spec, ctx)``


METHODS: tuple[EditMethod, ...] = (
    EditMethod(kind="p2p", model_kind="text2image", spec=P2PJobSpec, state=P2PJobState),
    EditMethod(kind="ip2p", model_kind="instruct", spec=IP2PJobSpec, state=IP2PJobState),
)

BY_KIND: dict[str, EditMethod] = {m.kind: m for m in METHODS}
BY_MODEL_KIND: dict[str, EditMethod] = {m.model_kind: m for m in METHODS}


def method_for(model_kind: str, spec: JobSpec, model_name: str = "") -> EditMethod:
    """The method a model of ``model_kind`` runs, refusing a spec of another method (field "model")."""
    method = BY_MODEL_KIND.get(model_kind)
    if method is None or not isinstance(spec, method.spec):
        raise EditValidationError("model", f"model {model_name!r} ({model_kind}) cannot run a {type(spec).__name__}")
    return method


def method_of_spec(spec: JobSpec) -> EditMethod:
    """The method a job spec belongs to (uploads and logs ask this instead of testing spec types)."""
    for method in METHODS:
        if isinstance(spec, method.spec):
            return method
    raise TypeError(f"no edit method takes a {type(spec).__name__}")
