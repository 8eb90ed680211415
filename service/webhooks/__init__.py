"""Webhook events for edits: emission (filter → throttle → enqueue) and the delivery process.

Why split in two: status changes happen inside the GPU loop, which must never wait on a user's server.
``emit`` only touches Redis (a few commands) and enqueues a delivery job on the RQ queue ``webhooks``;
``python -m service.webhooks`` (``Sender``: RQ's job bookkeeping and retry scheduler driven by a loop of its
own, which outlasts Redis outages) does the HTTP.

Emission, a JobStore listener (the gateway's and the worker's mains hand it to their store), told of every
status change: ``emit(redis, edit, "started"|"progress"|"completed",
tenant)``. Events the edit did not subscribe to (``edit.webhook.events``) are dropped; ``progress`` is
throttled per edit to ``settings.webhooks.progress_min_interval_seconds``; each event gets a stable
``webhook-id`` (``msg_{edit_id}_{started|completed|progress_<step>}``), reused by its retries and emitted at
most once, so receivers can deduplicate on it.

Delivery, per attempt: re-resolve and SSRF-check the URL (``service.egress``), sign with the tenant's
secret (Standard Webhooks, fresh ``webhook-timestamp`` per attempt), POST to the pinned IP without
following redirects. 2xx = delivered; 410 = give up and send nothing more for this edit; anything else
(3xx, 4xx, 5xx, timeout, connection error) is retried after ``backoff_seconds[attempt-1]`` ± jitter (a
longer ``Retry-After`` on 429/503 wins) until ``max_attempts``. ``progress`` events are sent once, never
retried: a late progress report is worse than none. Delivery order across events is not guaranteed.

Where outcomes go: each event's final outcome is mirrored into the edit record through
``JobStore.record_webhook_delivery`` (fields ``webhook_delivered``/``webhook_failed``/``webhook_last_error`` of
``editserve:edit:{id}``, rendered as ``Edit.webhook``); the details live in the keys below.

Redis keys (all expire after ``settings.webhooks.state_ttl_seconds``):

``editserve:webhook:{edit_id}`` — hash, delivery state of the edit's webhook:
    ``url``               destination as given
    ``events``            JSON list of subscribed event types
    ``delivered``         events delivered (2xx)
    ``failed``            events given up on (attempts exhausted, 410, refused destination)
    ``pending``           events queued or waiting for a retry
    ``attempts``          HTTP attempts made, refused ones included
    ``last_status``       HTTP status of the latest attempt that got an answer
    ``last_error``        reason of the latest failed attempt (kept after later successes)
    ``last_attempt_at``   ISO-8601 UTC time of the latest attempt
    ``gone``              "1" once the receiver answered 410: later events are dropped
    → ``read_state(redis, edit_id)`` turns it into the contract's ``WebhookDeliveryState``.
``editserve:webhook:{edit_id}:throttle`` — string with a PX expiry: a progress event was sent recently.
``editserve:webhook:{edit_id}:emitted`` — set of webhook-ids already enqueued (at-most-once emission).
``editserve:webhook:{edit_id}:done`` — hash, RQ job id → JSON outcome of the attempt that job ran: a job run
    again after an interruption (see "Redis outages") does not send or count that attempt a second time.
``editserve:webhooks:failed`` — stream of deliveries given up on (``failed`` after the last attempt, or
    ``refused``; not 410s, not progress events), newest ``FAILED_MAX_ENTRIES`` kept, none older than
    ``state_ttl_seconds``; each entry holds the whole delivery (body included) so it can be replayed:
    ``list_failed`` / ``replay_failed``, or ``python -m service.webhooks failed`` / ``replay ID``.

Metric: ``editserve_webhook_deliveries_total{outcome}``, one increment per attempt; outcome is one of
``DeliveryOutcome``: delivered, retrying (failed, will retry), failed (failed, no attempts left),
gone (410), refused (destination not allowed).

Redis outages (restarts, an AOF still ``LOADING``, a failover's read-only replica, timeouts): the process
(``Sender``, below) never exits on a ``redis.RedisError``. It logs once per outage, backs off (0.1 s doubling
to 5 s, jittered), and carries on with the same connection settings. Claim/acknowledge is RQ's: a job id is
moved to ``rq:queue:webhooks:intermediate`` when taken, gets a ``StartedJobRegistry`` entry while it runs and
leaves both when RQ records its end. An attempt cut off by an outage (the POST may or may not have reached
the receiver) is put back at the front of the queue once Redis answers and runs again: delivery is
at-least-once, always with the same ``webhook-id``. The ``:done`` mark, written in the same MULTI as the
attempt's counters and its next retry, keeps a job that already recorded its outcome from sending again.
Jobs left behind by a sender that died (SIGKILL, a cold stop during an outage) are requeued by any sender's
periodic sweep (``recover_stranded``) once their StartedJobRegistry entry has expired (the job timeout
+ 60 s) or, claimed but never started, after ``Sender.stranded_grace_seconds``.

Modules, one kind of caller each: ``events`` (the model: ``Delivery``, outcomes, the queue), ``emit`` (what
a JobStore listener runs: GPU workers and the gateway), ``delivery`` (one attempt; the RQ job ``deliver``),
``failed`` (the failed list and replay), ``sender`` (the process loop and stranded-job recovery),
``__main__`` (the CLI). This file imports none of them, so importing ``service.webhooks.emit`` loads no
HTTP client.
"""

from __future__ import annotations


def __getattr__(name: str):
    """``service.webhooks.deliver``: the RQ job name used before this became a package, so delivery jobs
    queued by an older version still run after an upgrade."""
    if name == "deliver":
        from service.webhooks.delivery import deliver

        return deliver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
