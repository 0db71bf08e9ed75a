"""Bearer API-key authentication for merchants."""

from rest_framework import authentication, exceptions, permissions

from orders.models import Merchant
from orders.services import merchant_authenticate


class MerchantKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, key = header.partition(" ")
        key = key.strip()
        # Not printable (a NUL byte): never a key of ours, and PostgreSQL refuses it in a query.
        if scheme.lower() != "bearer" or not key or len(key) > 200 or not key.isprintable():
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <api_key>'.")
        merchant = merchant_authenticate(api_key=key)
        if merchant is None:
            raise exceptions.AuthenticationFailed("Invalid API key.")
        return (merchant, key)

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'


class IsMerchant(permissions.BasePermission):
    def has_permission(self, request, view) -> bool:
        if not isinstance(request.user, Merchant):
            raise exceptions.NotAuthenticated("Missing API key: use 'Authorization: Bearer <api_key>'.")
        return True
