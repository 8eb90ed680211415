"""worker/editing/jobs.py: the job specs' small behaviours (pure, no model): errors, prompts, reproduction params."""

from __future__ import annotations

from worker.editing.jobs import EditValidationError, IP2PCell, IP2PJobSpec, JobResult, P2PJobSpec


def test_a_validation_error_carries_its_field_and_message():
    err = EditValidationError("target_prompts", "too long")
    assert str(err) == "target_prompts: too long"
    assert err.field == "target_prompts" and err.message == "too long"
    assert isinstance(err, ValueError)


def test_p2p_prompts_are_the_source_then_the_targets_and_share_the_seed():
    spec = P2PJobSpec(job_id="j", source_prompt="a cat", target_prompts=["a dog", "a fox"], seed=7)
    assert spec.prompts == ["a cat", "a dog", "a fox"]
    assert [spec.image_params(i) for i in range(3)] == [{"seed": 7}] * 3


def test_ip2p_params_are_those_of_each_cell_and_empty_outside():
    cells = [IP2PCell(text_guidance=7.5, image_guidance=1.5, seed=1), IP2PCell(text_guidance=3.0, image_guidance=2.0,
                                                                                seed=2)]
    spec = IP2PJobSpec(job_id="j", image=None, instruction="make it blue", cells=cells)
    assert spec.image_params(0) == {"seed": 1, "text_guidance": 7.5, "image_guidance": 1.5}
    assert spec.image_params(1) == {"seed": 2, "text_guidance": 3.0, "image_guidance": 2.0}
    assert spec.image_params(2) == {} and spec.image_params(-1) == {}


def test_a_result_is_ok_without_error_and_not_canceled():
    assert JobResult(job_id="j").ok
    assert not JobResult(job_id="j", error=EditValidationError("seed", "bad")).ok
    assert not JobResult(job_id="j", canceled=True).ok


def test_p2p_outputs_are_groups_one_per_seed_each_reproduced_by_its_seed():
    spec = P2PJobSpec(job_id="j", source_prompt="a cat", target_prompts=["a dog"], seed=7, seeds=[3, 5])
    assert spec.group_seeds == [3, 5]  # the listed seeds replace the single one
    assert [spec.group_of(i) for i in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [spec.image_params(i)["seed"] for i in range(4)] == [3, 3, 5, 5]
    assert spec.image_params(9) == {"seed": 5}  # past the last group: its seed, never an IndexError
    assert P2PJobSpec(job_id="j", source_prompt="a", target_prompts=[], seed=7, seeds=[]).group_seeds == [7]
