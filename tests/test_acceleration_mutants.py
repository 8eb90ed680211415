"""Row buckets and step-acceleration settings at their edges: what a worker's configuration turns into.

Cheap by design (no model, no compilation): ``torch.compile`` is replaced by a recorder where only its arguments
matter. The warm-up's shapes are checked in tests/test_step_acceleration.py (it has the tiny model loaded).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from worker.editing import acceleration
from worker.editing.acceleration import StepAcceleration, accelerated_unet, use_compile_cache
from worker.editing.buckets import bucket_for, padding_for, parse_buckets


def test_bucket_lists_from_the_environment_tolerate_spaces_and_trailing_commas():
    assert parse_buckets(" 8, 2 , 4, ") == (2, 4, 8)
    assert parse_buckets([4, "2", 4]) == (2, 4)


@pytest.mark.parametrize("bad", ["1,x", [1, None], "0", [3, -1]])
def test_a_bad_bucket_list_names_itself_in_the_error(bad):
    with pytest.raises(ValueError, match="row buckets must be positive integers") as raised:
        parse_buckets(bad)
    assert repr(bad) in str(raised.value)


def test_one_is_a_valid_bucket_and_rows_that_fill_a_bucket_need_no_padding():
    assert parse_buckets("1") == (1,)
    assert bucket_for(4, (1, 4)) == 4 and padding_for(4, (1, 4)) == 0
    assert padding_for(3, (1, 4)) == 1 and padding_for(9, (1, 4)) == 0


def test_the_defaults_run_everything_eager():
    eager = StepAcceleration()
    assert not eager.compiles_on("cpu") and not eager.compiles_on("cuda") and eager.row_buckets == ()
    with pytest.raises(ValueError, match="compile must be one of"):
        StepAcceleration(compile="yes")


def test_cuda_graphs_are_opt_in_and_only_on_cuda():
    assert StepAcceleration(compile="on").mode_on("cuda") == "max-autotune-no-cudagraphs"
    graphs = StepAcceleration(compile="on", compile_mode="default", cuda_graphs=True)
    assert graphs.mode_on("cuda:0") == "reduce-overhead" and graphs.mode_on("cpu") == "default"
    assert StepAcceleration(compile="auto").compiles_on("cuda:0") and not StepAcceleration(compile="off").compiles_on(
        "cuda")


def test_from_settings_carries_every_field():
    worker = SimpleNamespace(compile="on", compile_mode="default", cuda_graphs=True, inductor_cache_dir="/c",
                             row_buckets="2,1")
    made = StepAcceleration.from_settings(worker)
    assert made == StepAcceleration(compile="on", compile_mode="default", cuda_graphs=True, row_buckets=(1, 2),
                                    cache_dir="/c")
    auto = SimpleNamespace(compile="auto", compile_mode="default", cuda_graphs=False, inductor_cache_dir=None,
                           row_buckets="auto")
    assert StepAcceleration.from_settings(auto).row_buckets == ()  # the default device is the CPU: eager


@pytest.fixture
def clean_compile_env(monkeypatch, tmp_path):
    """The inductor cache settings restored after the test; HOME in tmp_path."""
    import torch._inductor.config as inductor_config

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE"):
        monkeypatch.setenv(var, "unset")
        monkeypatch.delenv(var)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return inductor_config


def test_the_compile_cache_goes_where_configured(clean_compile_env, tmp_path):
    use_compile_cache(None)
    use_compile_cache("")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and not clean_compile_env.fx_graph_cache
    use_compile_cache("~/cache/inductor")
    use_compile_cache("~/cache/inductor")  # a restarted worker finds it there
    path = tmp_path / "cache" / "inductor"
    assert path.is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1" and clean_compile_env.fx_graph_cache is True


def test_an_operator_choice_of_the_fx_graph_cache_is_kept(clean_compile_env, tmp_path):
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    use_compile_cache(tmp_path / "c")
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0"


@pytest.fixture
def fake_compile(monkeypatch, clean_compile_env):
    """``torch.compile`` recording its arguments; the compiled-UNet cache and the P2P hook restored afterwards."""
    from worker.editing.processor import P2PAttnProcessor

    calls = []

    def compile_(model, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(compiled=model, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(acceleration, "_COMPILED", {})
    monkeypatch.setattr(P2PAttnProcessor, "attend", P2PAttnProcessor.attend)
    return calls


def test_the_unet_is_compiled_once_per_mode_and_backend_with_static_shapes(fake_compile, tmp_path):
    from worker.editing.processor import P2PAttnProcessor

    model = SimpleNamespace(device=torch.device("cpu"), unet=torch.nn.Linear(1, 1))
    assert accelerated_unet(model, None) is None and accelerated_unet(model, StepAcceleration()) is None
    assert not fake_compile
    on = StepAcceleration(compile="on", cache_dir=str(tmp_path / "ind"))
    first = accelerated_unet(model, on)
    assert first.compiled is model.unet and fake_compile == [
        {"backend": "inductor", "dynamic": False, "mode": "max-autotune-no-cudagraphs"}]
    assert (tmp_path / "ind").is_dir()  # the cache is set up before compiling
    assert accelerated_unet(model, on) is first and len(fake_compile) == 1
    other = accelerated_unet(model, StepAcceleration(compile="on", backend="aot_eager"))
    assert other is not first and fake_compile[-1] == {"backend": "aot_eager", "dynamic": False}
    # the P2P hook runs outside the compiled graphs, wrapped once however often a UNet is compiled
    attend = P2PAttnProcessor.attend
    assert attend._editserve_eager is True
    accelerated_unet(model, StepAcceleration(compile="on", compile_mode="default"))
    assert P2PAttnProcessor.attend is attend and len(fake_compile) == 3
    second = SimpleNamespace(device=torch.device("cpu"), unet=torch.nn.Linear(1, 1))  # another model: its own
    assert accelerated_unet(second, on).compiled is second.unet and len(fake_compile) == 4


def test_auto_compiles_a_cuda_model_with_cuda_graphs_decided_by_the_models_device(fake_compile, tmp_path):
    """The model's own device decides: "auto" compiles a CUDA model, and CUDA graphs go with it (no GPU needed:
    torch.compile is faked)."""
    model = SimpleNamespace(device=torch.device("cuda"), unet=torch.nn.Linear(1, 1))
    compiled = accelerated_unet(model, StepAcceleration(compile="auto", cuda_graphs=True, cache_dir=str(tmp_path)))
    assert compiled.compiled is model.unet and fake_compile == [
        {"backend": "inductor", "dynamic": False, "mode": "reduce-overhead"}]
    assert accelerated_unet(SimpleNamespace(device=torch.device("cpu"), unet=model.unet),
                            StepAcceleration(compile="auto", cuda_graphs=True)) is None
