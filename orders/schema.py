"""OpenAPI description of our Bearer API-key authentication (drf-spectacular extension)."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class MerchantKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "orders.authentication.MerchantKeyAuthentication"
    name = "merchantApiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "The merchant's API key: `Authorization: Bearer sk_…`.",
        }
