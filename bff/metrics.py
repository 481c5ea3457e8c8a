"""Prometheus counters in the text exposition format, per process.

Small on purpose: a dict of counters is all the hot path should pay for. Each worker process
counts on its own; with several workers sharing the metrics port (``bff/health.py``) a scrape shows
the worker the kernel picked, until a later change aggregates them (prometheus-client's
multiprocess mode).
"""

from __future__ import annotations

from collections import Counter

__all__ = ["Metrics"]

_HELP = {
    "bff_requests_total": "Requests answered, by route kind and status.",
    "bff_logins_total": "Completed logins, by outcome.",
    "bff_refreshes_total": "Access-token refreshes at the OP, by outcome.",
    "bff_logouts_total": "Sessions ended, by cause.",
    "bff_upstream_errors_total": "Upstream failures, by kind.",
    "bff_rate_limit_total": "Rate-limit decisions other than allowed, by endpoint and outcome.",
}


class Metrics:
    def __init__(self) -> None:
        self._counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        self._counts[(name, tuple(sorted(labels.items())))] += amount

    def value(self, name: str, **labels: str) -> int:
        return self._counts[(name, tuple(sorted(labels.items())))]

    def render(self) -> str:
        lines: list[str] = []
        by_name: dict[str, list[str]] = {}
        for (name, labels), count in sorted(self._counts.items()):
            label_text = ",".join(f'{k}="{v}"' for k, v in labels)
            by_name.setdefault(name, []).append(
                f"{name}{{{label_text}}} {count}" if label_text else f"{name} {count}"
            )
        for name, samples in by_name.items():
            lines.append(f"# HELP {name} {_HELP.get(name, name)}")
            lines.append(f"# TYPE {name} counter")
            lines.extend(samples)
        return "\n".join(lines) + "\n"
