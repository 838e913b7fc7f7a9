"""How numbers, axis values and strategy names read in captions, tables and figure labels."""

from __future__ import annotations

import math
from collections.abc import Sequence

STRATEGY_LABELS = {"iterative": "iterative", "speculative": "speculative", "pipeinfer": "PipeInfer",
                   "pipespec": "PipeSpec", "pipespec-sync": "PipeSpec (sync)", "speed": "SPEED"}
STRATEGY_COLORS = {"iterative": "#6b6b6b", "speculative": "#1f77b4", "pipeinfer": "#d62728",
                   "pipespec": "#2ca02c", "pipespec-sync": "#98df8a", "speed": "#9467bd"}
_EXTRA_COLORS = ("#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")

# Axis keys: (noun for captions, how a value is written)
AXIS_NOUNS = {"network.bandwidth": "bandwidth", "network.latency": "latency", "cluster.count": "node count",
              "acceptance.alpha": "α", "strategy.gamma": "γ", "strategy.micro_batch": "micro-batch",
              "workload.generate_tokens": "generated tokens", "workload.prompt_tokens": "prompt tokens",
              "variant": "variant"}


def strategy_label(name: str) -> str:
    return STRATEGY_LABELS.get(name, name)


def strategy_color(name: str, order: Sequence[str] = ()) -> str:
    if name in STRATEGY_COLORS:
        return STRATEGY_COLORS[name]
    index = list(order).index(name) if name in order else len(name)
    return _EXTRA_COLORS[index % len(_EXTRA_COLORS)]


def significant(value: float, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, no exponent, trailing zeros dropped."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fmt_bandwidth(bits_per_s: float) -> str:
    """``1 Gbit/s``, ``31.6 Mbit/s``."""
    for scale, unit in ((1e12, "Tbit/s"), (1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bits_per_s >= scale * 0.9995:
            return f"{significant(bits_per_s / scale)} {unit}"
    return f"{significant(bits_per_s)} bit/s"


def fmt_seconds(seconds: float) -> str:
    """``0.84 s``, ``85 ms``, ``120 µs``."""
    if seconds != seconds:  # NaN
        return "n/a"
    magnitude = abs(seconds)
    if magnitude >= 1 or magnitude == 0:
        return f"{significant(seconds)} s"
    if magnitude >= 1e-3:
        return f"{significant(seconds * 1e3)} ms"
    return f"{significant(seconds * 1e6)} µs"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


def fmt_rate(value: float) -> str:
    return f"{significant(value)} tok/s"


def fmt_pct(fraction: float) -> str:
    return f"{fraction * 100:.0f}%"


def fmt_alpha(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if value not in (0, 1) else f"{value:.0f}"


def fmt_axis_value(key: str, value: float | str) -> str:
    """An axis value as a caption writes it: ``1 Gbit/s``, ``8 nodes``, ``α=0.7``, ``γ=4``."""
    if isinstance(value, str):
        return value
    if key == "network.bandwidth":
        return fmt_bandwidth(value)
    if key == "network.latency":
        return fmt_seconds(value)
    if key == "cluster.count":
        return f"{value:g} nodes"
    if key == "acceptance.alpha":
        return f"α={fmt_alpha(value)}"
    if key == "strategy.gamma":
        return f"γ={value:g}"
    if key == "strategy.micro_batch":
        return f"micro-batch {value:g}"
    return f"{key}={significant(float(value))}"


def axis_noun(key: str) -> str:
    return AXIS_NOUNS.get(key, key)


def join_words(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]
