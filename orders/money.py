"""Money for people: minor units to a formatted amount, with ISO 4217 exponents from Babel (CLDR)."""

from decimal import Decimal

from babel.numbers import format_currency, get_currency_precision


def money_major(*, amount: int, currency: str) -> Decimal:
    """`amount` minor units as a Decimal in major units: 1050 USD -> 10.50, 1050 JPY -> 1050."""
    return Decimal(amount).scaleb(-get_currency_precision(currency))


def money_format(*, amount: int, currency: str) -> str:
    """1050 USD -> "10.50 USD"; 1050 JPY -> "1,050 JPY"; 1050 KWD -> "1.050 KWD".

    The ISO code rather than a symbol: "$" is ambiguous between USD, CAD, AUD... for operators.
    """
    major = money_major(amount=amount, currency=currency)
    return format_currency(major, currency, format="#,##0.00 ¤¤", locale="en_US", currency_digits=True)
