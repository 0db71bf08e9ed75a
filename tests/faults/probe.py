"""The project's Celery app, plus task start/end markers: what the fault stack's workers run.

Started as `celery -A tests.faults.probe worker ...` (harness.FaultStack), a worker behaves as
production's, and each pool process also appends one JSON line per task start and end to
`$FAULT_TASK_DIR/<pid>.log`. The fault tests read them as evidence written by the process that ran
the task: which order (and, for a refund's stage, which refund) a killed pool child was working on
(a start with no end), that two copies of a message ran at the same time (both starts before
either end).

With the file `$FAULT_TASK_DIR/rendezvous` present, a stage task waits at its start (at most
RENDEZVOUS_SECONDS) until a second copy of the same task for the same order has started too, so
that "two copies at once" happens at once instead of by luck of timing (a refund's copies meet by
refund, since an order may have several refunds in flight).
"""

import json
import os
import time

from celery import signals

from config.celery_app import app

__all__ = ["app"]

TASK_DIR = os.environ.get("FAULT_TASK_DIR", "")
RENDEZVOUS_SECONDS = 3.0
STAGE_TASKS = (
    "allocation.allocate",
    "gateway.charge",
    "gateway.confirm",
    "callbacks.callback",
    "gateway.refund",
)


def _order_of(args) -> str | None:
    message = args[0] if args and isinstance(args[0], dict) else {}
    return message.get("order_id")


def _refund_of(args) -> str | None:
    message = args[0] if args and isinstance(args[0], dict) else {}
    payload = message.get("payload")
    return payload.get("refund_id") if isinstance(payload, dict) else None


def _write(record: dict) -> None:
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(os.path.join(TASK_DIR, f"{os.getpid()}.log"), os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _met_twin(task: str, subject: str, task_id: str) -> None:
    """Say this copy has started, then wait (bounded) until a second copy has said so too."""
    meeting = os.path.join(TASK_DIR, "met", f"{task}-{subject}")
    os.makedirs(meeting, exist_ok=True)
    open(os.path.join(meeting, task_id), "w").close()
    deadline = time.monotonic() + RENDEZVOUS_SECONDS
    while len(os.listdir(meeting)) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)


@signals.task_prerun.connect
def _task_started(task_id=None, task=None, args=None, **_) -> None:
    if not TASK_DIR:
        return
    order_id = _order_of(args)
    refund_id = _refund_of(args)
    _write(
        {
            "ev": "start",
            "task": task.name,
            "order": order_id,
            "refund": refund_id,
            "id": task_id,
            "pid": os.getpid(),
            "t": time.time(),
        }
    )
    if order_id and task.name in STAGE_TASKS and os.path.exists(os.path.join(TASK_DIR, "rendezvous")):
        _met_twin(task.name, refund_id or order_id, task_id)


@signals.task_postrun.connect
def _task_ended(task_id=None, task=None, args=None, state=None, **_) -> None:
    if TASK_DIR:
        _write(
            {
                "ev": "end",
                "task": task.name,
                "order": _order_of(args),
                "refund": _refund_of(args),
                "id": task_id,
                "pid": os.getpid(),
                "t": time.time(),
                "state": state,
            }
        )
