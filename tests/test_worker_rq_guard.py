"""Pin the rq internals the batching worker (worker/runtime/rqbridge.py, batching.py, reaper.py) and the webhook
sender's own loop (service/webhooks.py ``Sender``) rely on.

rq 3.0 changed ``handle_job_success``/``perform_job`` to take the execution explicitly and moved the current
job to contextvars; our bridge sets ``worker.execution`` and calls the 2.x signatures. If any of these
change, this test fails before a worker silently leaves jobs in StartedJobRegistry.
"""

from __future__ import annotations

import inspect

import redis
import rq
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_rq_is_the_pinned_2x_series():
    assert rq.__version__.split(".")[0] == "2", rq.__version__
    assert tuple(int(x) for x in rq.__version__.split(".")[:2]) >= (2, 12)


def test_worker_finish_handlers_take_2x_arguments():
    assert params(SimpleWorker.handle_job_success) == ["self", "job", "queue", "started_job_registry"]
    assert params(SimpleWorker.handle_job_failure) == ["self", "job", "queue", "started_job_registry", "exc_string"]
    assert params(SimpleWorker.cleanup_execution) == ["self", "job", "pipeline"]
    assert params(SimpleWorker.register_birth) == ["self"] and params(SimpleWorker.register_death) == ["self"]
    assert params(SimpleWorker.heartbeat) == ["self", "timeout", "pipeline"]
    # handle_job_success/failure read the execution from this attribute (3.0 passes it as an argument)
    worker = SimpleWorker([], connection=redis.Redis(), prepare_for_work=False)
    assert hasattr(worker, "execution") and worker.execution is None
    assert "self.execution" in inspect.getsource(SimpleWorker.handle_job_success)


def test_execution_api():
    assert params(Execution.create) == ["job", "ttl", "pipeline", "worker_name"]
    assert params(Execution.heartbeat) == ["self", "started_job_registry", "ttl", "pipeline"]
    assert params(Execution.delete) == ["self", "job", "pipeline"]
    assert params(Execution.from_composite_key) == ["composite_key", "connection"]
    assert Execution("e1", "j1", redis.Redis()).composite_key == "j1:e1"


def test_job_queue_and_registry_api():
    assert params(Job.prepare_for_execution) == ["self", "worker_name", "pipeline"]
    assert params(Job.set_status) == ["self", "status", "pipeline"]
    assert params(Queue.enqueue_job)[:4] == ["self", "job", "pipeline", "at_front"]
    assert params(FailedJobRegistry.add) == ["self", "job", "ttl", "exc_string", "pipeline"]
    assert params(FinishedJobRegistry.add)[:4] == ["self", "job", "ttl", "pipeline"]
    assert params(CanceledJobRegistry.add)[:4] == ["self", "job", "ttl", "pipeline"]
    # key layouts our Lua scripts and the reaper address directly
    conn = redis.Redis()
    assert StartedJobRegistry("q", connection=conn).key == "rq:wip:q"
    assert Queue("q", connection=conn).key == "rq:queue:q"
    assert Queue("q", connection=conn).intermediate_queue_key == "rq:queue:q:intermediate"
    iq = IntermediateQueue("rq:queue:q", conn)
    assert iq.key == "rq:queue:q:intermediate"
    assert {"set_first_seen", "get_first_seen", "get_first_seen_key", "get_job_ids"} <= set(dir(iq))


def test_started_registry_scores_are_heartbeat_expiry():
    """The reaper treats ``score < now`` as "heartbeat expired"; RQ must still score entries that way."""
    source = inspect.getsource(StartedJobRegistry.add_execution)
    assert "current_timestamp() + ttl" in source
    assert "xx=xx" in source  # heartbeats (xx=True) never resurrect an entry the reaper removed


def test_the_webhook_senders_rq_pieces():
    """``Sender`` drives RQ's per-job machinery from its own loop and runs RQ's scheduler in-process."""
    from rq.exceptions import DequeueTimeout
    from rq.scheduler import RQScheduler
    from rq.utils import parse_composite_key

    assert params(Queue.dequeue_any)[:3] == ["queues", "timeout", "connection"]
    assert issubclass(DequeueTimeout, Exception)
    assert params(SimpleWorker.execute_job) == ["self", "job", "queue"]
    assert params(SimpleWorker.handle_exception) == ["self", "job", "exc_info"]
    assert params(RQScheduler.__init__)[:3] == ["self", "queues", "connection"]
    for name, expected in [("acquire_locks", ["self", "auto_start"]), ("enqueue_scheduled_jobs", ["self"]),
                           ("heartbeat", ["self"]), ("register_birth", ["self"]), ("release_locks", ["self"]),
                           ("register_death", ["self"])]:
        assert params(getattr(RQScheduler, name)) == expected, name
    scheduler = RQScheduler([Queue("webhooks", connection=redis.Redis())], connection=redis.Redis())
    assert scheduler.should_reacquire_locks is True and scheduler.acquired_locks == set()
    assert parse_composite_key("job1:exec1") == ("job1", "exec1")
