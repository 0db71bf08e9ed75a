"""The Django admin registrations of every app, one module per app (admin autodiscovery imports
this package when the `console` app is installed)."""

from console.admin import allocation, callbacks, gateway, orders, refunds  # noqa: F401
