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


def families_query(names: frozenset[str]) -> str:
    """The query string that asks a prometheus-client ``/metrics`` for these families only (``name[]=...``).

    Metric names need no escaping. An exporter that ignores it sends its whole page, which
    :func:`only_families` then cuts down.
    """
    return "&".join(f"name[]={name}" for name in sorted(names))


def only_families(text: str, names: frozenset[str]) -> str:
    """The lines of an exposition page that belong to the families ``names`` (their samples, HELP and TYPE).

    The parser costs about a millisecond for a substation's page, most of it on series
    nobody polling it reads; picking the few lines needed first leaves it a dozen.
    """
    kept = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            name = parts[2] if len(parts) > 2 else ""
        else:
            name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names or name.removesuffix("_total") in names:
            kept.append(line)
    return "\n".join(kept) + "\n"


def parse_metrics(text: str, only: frozenset[str] | None = None) -> Scrape:
    """Parse an exposition page, or only the families ``only``; raises ``ValueError`` when it is not one."""
    if only is not None:
        text = only_families(text, only)
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return Scrape(samples)
