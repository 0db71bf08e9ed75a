"""URL map: the merchant API, provider webhooks, docs, probes and the operators' console."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from config import dashboard, health, metrics

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

handler400 = "config.errors.handler400"
handler403 = "config.errors.handler403"
handler404 = "config.errors.handler404"
handler500 = "config.errors.handler500"
