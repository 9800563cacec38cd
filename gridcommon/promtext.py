"""Reading the Prometheus text exposition format with prometheus-client's own parser."""
from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """Every sample of one /metrics page, keyed by sample name."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def value(self, name: str, default: float | None = None, **labels: str) -> float | None:
        """The first sample called ``name`` whose labels include ``labels``."""
        for sample_labels, value in self.samples.get(name, []):
            if all(sample_labels.get(key) == wanted for key, wanted in labels.items()):
                return value
        return default

    def labels_of(self, name: str) -> dict[str, str] | None:
        entries = self.samples.get(name)
        return dict(entries[0][0]) if entries else None


def parse_metrics(text: str) -> Scrape:
    """Parse an exposition page; raises ``ValueError`` when it is not one."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return Scrape(samples)
