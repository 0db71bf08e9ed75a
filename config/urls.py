"""URL map: the merchant API, provider webhooks, docs, probes and the operators' console."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from console import dashboard, health, metrics

urlpatterns = [
    path("api/v1/", include("orders.urls")),
    path("api/v1/gateway/", include("gateway.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("healthz", health.healthz),
    path("readyz", health.readyz),
    path("metrics", metrics.metrics_view, name="metrics"),
    # Before admin.site.urls; admin_view: staff only, others go to the admin login.
    path("admin/dashboard/", admin.site.admin_view(dashboard.dashboard), name="admin-dashboard"),
    path("admin/", admin.site.urls),
]

handler400 = "core.exception_handlers.handler400"
handler403 = "core.exception_handlers.handler403"
handler404 = "core.exception_handlers.handler404"
handler500 = "core.exception_handlers.handler500"
