from django.urls import path

from orders import apis

urlpatterns = [
    path("orders", apis.OrderListCreateApi.as_view(), name="orders"),
    path("orders/<str:order_id>", apis.OrderDetailApi.as_view(), name="order-detail"),
    path("orders/<str:order_id>/events", apis.OrderEventsApi.as_view(), name="order-events"),
]
