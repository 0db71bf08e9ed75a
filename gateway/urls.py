from django.urls import path

from gateway import webhooks

urlpatterns = [
    path("webhooks/<str:provider>", webhooks.provider_webhook, name="provider-webhook"),
]
