"""The editing core: Prompt-to-Prompt and InstructPix2Pix samplers and the batch runner.

Plain library code: no Redis, no HTTP. The worker process translates queue payloads into the
specs in ``jobs`` and hands them to ``batch.BatchRunner``.
"""
