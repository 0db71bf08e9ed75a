"""Event topics and the registry of who listens to them; apps subscribe in their AppConfig.ready()."""

from collections.abc import Callable
from dataclasses import dataclass

ORDER_CREATED = "order-created"
CHANNEL_ALLOCATED = "payment-channel-allocated"
ORDER_UPDATED = "order-updated"
REFUND_CREATED = "refund-created"
REFUND_UPDATED = "refund-updated"
TOPICS = (ORDER_CREATED, CHANNEL_ALLOCATED, ORDER_UPDATED, REFUND_CREATED, REFUND_UPDATED)


@dataclass(frozen=True)
class Subscriber:
    task_name: str
    when: Callable[[dict], bool] | None = None


_subscribers: dict[str, list[Subscriber]] = {topic: [] for topic in TOPICS}


def subscribe(topic: str, task_name: str, *, when: Callable[[dict], bool] | None = None) -> None:
    """Deliver every event of `topic` (whose payload passes `when`) to the Celery task `task_name`."""
    if topic not in _subscribers:
        raise ValueError(f"unknown topic {topic!r}")
    if all(s.task_name != task_name for s in _subscribers[topic]):
        _subscribers[topic].append(Subscriber(task_name, when))


def subscribers_for(topic: str, payload: dict) -> list[str]:
    return [s.task_name for s in _subscribers[topic] if s.when is None or s.when(payload)]
