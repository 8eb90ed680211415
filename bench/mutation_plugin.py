"""Speed-ups for mutmut's per-mutant pytest runs, loaded only in bench/mutation.py's scratch trees.

Why: mutmut's fork server imports the tests once (``forkserver_warmup = collect``) and forks one child per
mutant, but each child still runs a fresh ``pytest.main``. Measured on the 2-core box (words.py, 54 selected
tests taking 0.2 s): ~12 s per mutant, of which ~6 s were pytest's ``gc_collect_harder`` walking the heap that
torch/transformers/diffusers left (five full collections), ~2.7 s building the CLIP tokenizer twice (two
module fixtures) and the rest collection. Here:

- the heap that exists once the tests are imported is frozen (``gc.freeze``): later collections skip it;
- ``build_clip_tokenizer`` returns one tokenizer built in the fork server at import (the tokenizer is not a
  mutated module; tests only read it);
- with ``EDITSERVE_MUTATION_PRELOAD=tiny-sd,tiny-ip2p`` the registry's ``load_pipeline`` returns pipelines
  loaded once in the fork server (each mutant's child gets a copy-on-write copy, so what a test patches never
  reaches the next mutant). Only for modules whose tests build the tiny models per test module.

Nothing here changes what a test asserts; the clean run mutmut does first (all selected tests must pass with
no mutant active) checks the setup.
"""

from __future__ import annotations

import gc
import os
import tempfile

import torch

torch.set_num_threads(1)  # no intra-op pool in the fork server: forking after torch work stays safe

import worker.models.tokenizer as _tokenizer  # noqa: E402

_original_build = _tokenizer.build_clip_tokenizer
_TOKENIZER = _original_build(tempfile.mkdtemp(prefix="mutation-tok-"))


def _cached_build_clip_tokenizer(folder):  # the folder is ignored: one tokenizer per fork server
    return _TOKENIZER


_tokenizer.build_clip_tokenizer = _cached_build_clip_tokenizer

_preload = [n for n in os.environ.get("EDITSERVE_MUTATION_PRELOAD", "").split(",") if n]
if _preload:
    import worker.models.registry as _registry
    from service.config import Settings

    _original_load = _registry.load_pipeline
    _PIPES: dict[str, object] = {}

    def _key(spec) -> str:
        return spec.model_dump_json()

    def _cached_load_pipeline(spec):
        key = _key(spec)
        if key not in _PIPES:
            _PIPES[key] = _original_load(spec)
        return _PIPES[key]

    _registry.load_pipeline = _cached_load_pipeline
    _reg = _registry.ModelRegistry(Settings())
    for _name in _preload:
        _reg.get(_name)


def pytest_sessionstart(session):
    gc.collect()
    gc.freeze()


_FILE_ORDER = [f for f in os.environ.get("EDITSERVE_MUTATION_TESTS", "").split(",") if f]


def pytest_collection_modifyitems(session, config, items):
    """Test files in MODULES' order (cheap unit files first), mutmut's by-duration order kept within a file.

    Why: mutmut orders a mutant's tests by their call time alone, so a test whose cost is a module fixture
    (setup) can come before the cheap test that would fail first; interleaved files also set a module's
    fixtures up again each time the file comes back. Sorting only reorders: a mutant's verdict is the same.
    """
    if _FILE_ORDER:
        rank: dict[str, int] = {}
        for i, entry in enumerate(_FILE_ORDER):  # entries may name one test ("file.py::test")
            rank.setdefault(entry.split("::")[0], i)
        items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0].removeprefix("mutants/"), len(rank)))


# --- one Redis and one S3 endpoint per module run (started by bench/mutation.py), not one per mutant --------
# Each mutant's pytest session would otherwise start its own redis-server (and weed mini, ~5-10 s). Children
# run at the same time and tests flush their database, so each session takes the next of 31 databases.

if os.environ.get("EDITSERVE_MUTATION_REDIS"):
    import pytest

    @pytest.fixture(scope="session")
    def redis_server():
        import redis

        from devtools.devstack import RedisServer

        base = os.environ["EDITSERVE_MUTATION_REDIS"].rstrip("/")
        db = 1 + (redis.Redis.from_url(base + "/0").incr("mutation:session") % 31)
        return RedisServer(url=f"{base}/{db}")  # no process: stop() leaves the shared server running

if os.environ.get("EDITSERVE_MUTATION_S3"):
    import pytest

    @pytest.fixture(scope="session")
    def s3_server():
        from devtools.devstack import S3Server

        return S3Server(**__import__("json").loads(os.environ["EDITSERVE_MUTATION_S3"]))
