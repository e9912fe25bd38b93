"""OpenRouter's ``provider`` object in a request body, parsed into :class:`ProviderPreferences`."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import get_args

from coordinator.api import ProviderPreferences, ProviderSort
from coordinator.dispatch.privacy import PrivacyPolicy
from coordinator.errors import InvalidRequestError


def parse_provider(value: object) -> ProviderPreferences:
    """OpenRouter's ``provider`` object: ``sort``, ``max_price``, ``allow_fallbacks`` and
    ``data_collection`` are honoured, and our ``trust`` (``"vetted"``: only miners the operator
    vetted); its other keys (order, only, ignore, quantizations, ...) name hosting companies
    this marketplace does not have, and are ignored."""
    if value is None:
        return ProviderPreferences()
    if not isinstance(value, dict):
        raise InvalidRequestError("provider must be an object", param="provider")
    sort = value.get("sort")
    if sort is not None and sort not in get_args(ProviderSort):
        raise InvalidRequestError(
            "provider.sort must be one of price, throughput, latency", param="provider.sort"
        )
    fallbacks = value.get("allow_fallbacks")
    if fallbacks is not None and not isinstance(fallbacks, bool):
        raise InvalidRequestError(
            "provider.allow_fallbacks must be a boolean", param="provider.allow_fallbacks"
        )
    max_price = value.get("max_price")
    if max_price is not None and not isinstance(max_price, dict):
        raise InvalidRequestError(
            "provider.max_price must be an object", param="provider.max_price"
        )
    prices = max_price or {}
    data_collection = value.get("data_collection")
    if data_collection is not None and data_collection not in ("allow", "deny"):
        raise InvalidRequestError(
            'provider.data_collection must be "allow" or "deny"', param="provider.data_collection"
        )
    trust = value.get("trust")
    if trust is not None and trust not in ("any", "vetted"):
        raise InvalidRequestError(
            'provider.trust must be "any" or "vetted"', param="provider.trust"
        )
    return ProviderPreferences(
        sort=sort,
        max_prompt_price=_price_cap(prices.get("prompt"), "prompt"),
        max_completion_price=_price_cap(prices.get("completion"), "completion"),
        allow_fallbacks=fallbacks is not False,
        privacy=PrivacyPolicy(
            vetted_only=trust == "vetted", no_retention=data_collection == "deny"
        ),
    )


def _price_cap(value: object, name: str) -> Decimal | None:
    """A max_price field: credits per million tokens, a number or (as OpenRouter's SDKs send
    it) a decimal string; exact, so a cap equal to the price passes."""
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise InvalidOperation
        # str() first: the float 0.1 means the decimal 0.1, not its binary approximation.
        cap = Decimal(str(value).strip())
    except InvalidOperation:
        cap = Decimal("NaN")
    if not cap.is_finite() or cap < 0:
        raise InvalidRequestError(
            f"provider.max_price.{name} must be a non-negative number (credits per million tokens)",
            param=f"provider.max_price.{name}",
        )
    return cap
