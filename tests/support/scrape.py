"""Reading a ``/metrics`` scrape with prometheus-client's own parser, for assertions."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["sample", "samples"]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: ``(name, sorted labels) -> value``. A name twice is an error."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in found, f"sample {key} appears twice in one scrape"
            found[key] = s.value
    return found


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value, 0.0 when absent (a counter never incremented is not exported)."""
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)
