"""Payment-method tokens on orders (SPEC 11): what one may look like, and how it is shown masked."""

import re

# Stripe's ids and test tokens (`pm_1Q…`, `pm_card_visa`, `pm_card_chargeCustomerFail`).
STRIPE_TOKEN = re.compile(r"pm_[A-Za-z0-9_]{1,200}")
MAX_LENGTH = 203


def is_valid(token: str) -> bool:
    return isinstance(token, str) and STRIPE_TOKEN.fullmatch(token) is not None


def mask(token: str | None) -> str:
    """The token as logs and the console show it: its prefix and its last four characters only."""
    if not token:
        return ""
    prefix = token.split("_", 1)[0] + "_" if "_" in token else ""
    return f"{prefix}…{token[-4:]}" if len(token) > len(prefix) + 4 else f"{prefix}…"
