"""Attach CLIP scores to the finished jobs of one batch that asked for ``metrics``: one scoring pass for all.

P2P: each target image against its group's source image (index 0 of each seed's group), captions = source and target prompts; the
source image itself gets no scores. IP2P: each output against the (resized) input image; caption and
directional scores only when the job carries both captions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.editing.jobs import IP2PJobSpec, JobResult, JobSpec, P2PJobSpec
from worker.scoring.clip import ClipScorer, ScoreRequest, score_requests, to_chw


def score_request(spec: JobSpec, result: JobResult) -> tuple[ScoreRequest, list[int]] | None:
    """The pairs of one job, and which result image each pair's scores belong to."""
    if not getattr(spec, "score", False) or not result.ok or not result.images:
        return None
    outputs = to_chw(result.pixels) if result.pixels is not None else to_chw(result.images)
    if isinstance(spec, P2PJobSpec):  # per group (one per seed): its targets against its own source
        prompts, n = spec.prompts, len(spec.prompts)
        targets = [i for i in range(outputs.shape[0]) if i % n]
        pairs = [(i - i % n, i, prompts[0], prompts[i % n]) for i in targets]
        return ScoreRequest(outputs, pairs), targets
    if isinstance(spec, IP2PJobSpec):
        images = torch.cat([to_chw([spec.image]), outputs])
        cap_in, cap_out = spec.captions if spec.captions else (None, None)
        pairs = [(0, 1 + i, cap_in, cap_out) for i in range(outputs.shape[0])]
        return ScoreRequest(images, pairs), list(range(outputs.shape[0]))
    return None


def attach_scores(scorer: ClipScorer, jobs: Sequence[tuple[JobSpec, JobResult]]) -> int:
    """Fill ``result.scores`` for every job that asked; returns how many jobs were scored."""
    wanted = []
    for spec, result in jobs:
        made = score_request(spec, result)
        if made is not None:
            wanted.append((result, *made))
    if not wanted:
        return 0
    scores = score_requests(scorer, [request for _, request, _ in wanted])
    for (result, _, targets), job_scores in zip(wanted, scores):
        result.scores = [None] * len(result.images)
        for image_index, pair in zip(targets, job_scores):
            result.scores[image_index] = pair
    return len(wanted)
