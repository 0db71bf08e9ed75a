from django.urls import path

from orders import apis

urlpatterns = [
    path("orders", apis.OrderListCreateApi.as_view(), name="orders"),
    path("orders/<str:order_id>", apis.OrderDetailApi.as_view(), name="order-detail"),
    path("orders/<str:order_id>/events", apis.OrderEventsApi.as_view(), name="order-events"),
    path("orders/<str:order_id>/refunds", apis.OrderRefundsApi.as_view(), name="order-refunds"),
    path("refunds/<str:refund_id>", apis.RefundDetailApi.as_view(), name="refund-detail"),
    path("refunds/<str:refund_id>/events", apis.RefundEventsApi.as_view(), name="refund-events"),
]
