"""Cost of a call in USD from a price table in the configuration.

The table maps a model name to prices in USD per million tokens:

    {"gpt-4.1-mini": {"input": 0.40, "cached_input": 0.10, "output": 1.60},
     "claude-sonnet-4": {"input": 3.0, "cached_input": 0.30, "cache_write": 3.75, "output": 15.0}}

`cached_input` defaults to `input`, `cache_write` to 1.25 x `input` (Anthropic's 5-minute cache write).
Batch APIs are billed at half price (BATCH_DISCOUNT).

>>> table = {"m": {"input": 2.0, "cached_input": 0.5, "output": 8.0}}
>>> cost_usd("m", Usage(input_tokens=1_000_000, cached_input_tokens=500_000, output_tokens=100_000), table)
2.05
>>> cost_usd("m", Usage(input_tokens=1_000_000, output_tokens=0), table, batch=True)
1.0
"""

from __future__ import annotations

from collections.abc import Mapping

from cso_lib.errors import ConfigError
from cso_lib.llm.types import Usage

BATCH_DISCOUNT = 0.5
PRICE_KEYS = ("input", "cached_input", "cache_write", "output")


def cost_usd(model: str, usage: Usage, price_table: Mapping[str, Mapping[str, float]], batch: bool = False) -> float:
    """USD for `usage` of `model`; ConfigError if the table has no price for it (check at job start)."""
    prices = price_table.get(model)
    if prices is None:
        raise ConfigError(f"no price for model {model!r} in the price table (known: {sorted(price_table)!r})")
    unknown = set(prices) - set(PRICE_KEYS)
    if unknown or "input" not in prices or "output" not in prices:
        raise ConfigError(
            f"price_table[{model!r}]={dict(prices)!r}: needs 'input' and 'output', may have 'cached_input' and "
            f"'cache_write' (USD per million tokens)"
        )
    p_in = float(prices["input"])
    p_cached = float(prices.get("cached_input", p_in))
    p_write = float(prices.get("cache_write", 1.25 * p_in))
    plain = max(0, usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens)
    total = (plain * p_in + usage.cached_input_tokens * p_cached + usage.cache_write_tokens * p_write
             + usage.output_tokens * float(prices["output"])) / 1e6
    return round(total * (BATCH_DISCOUNT if batch else 1.0), 10)
