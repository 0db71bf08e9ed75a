"""Reads of the orders service."""

from django.db.models import QuerySet

from orders.models import Merchant, Order, OrderTransition


def order_list(*, merchant: Merchant, filters: dict) -> QuerySet[Order]:
    qs = Order.objects.filter(merchant=merchant)
    for name in ("status", "outcome", "reference"):
        if name in filters:
            qs = qs.filter(**{name: filters[name]})
    if "created_after" in filters:
        qs = qs.filter(created_at__gte=filters["created_after"])
    if "created_before" in filters:
        qs = qs.filter(created_at__lt=filters["created_before"])
    return qs


def order_get(*, merchant: Merchant, order_id) -> Order | None:
    return Order.objects.filter(merchant=merchant, pk=order_id).first()


def order_transitions(*, order: Order) -> QuerySet[OrderTransition]:
    return OrderTransition.objects.filter(order=order).order_by("id")
