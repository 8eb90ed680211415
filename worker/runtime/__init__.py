"""The GPU worker process: batching RQ consumer, recovery of abandoned jobs, and result uploads.

Module map (one job each):

- ``batching``   claim jobs atomically from the edit queues and gather one compatible batch
- ``rqbridge``   RQ bookkeeping per job (Execution, heartbeats, finish/fail/cancel/requeue); the only
                 module that touches rq internals, pinned to rq 2.12 by ``tests/test_worker_rq_guard.py``
- ``execute``    payload → core job spec translation (and the ``run_single`` RQ function marker)
- ``progress``   the ``on_step`` callback: throttled heartbeats, progress, cancel checks, step timing
- ``uploads``    result PNGs and attention maps → S3 under ``edits/{id}/``
- ``processing`` one gathered batch end to end: translate, run (split on batch failure), upload, finish
- ``finishing``  the finisher thread: settles one ran batch's jobs while the loop runs the next batch
- ``reaper``     abandoned StartedJobRegistry entries → requeue at the front, or fail after N crashes
- ``worker``     the process: model loading, the loop, signals, metrics port, CLI
"""
