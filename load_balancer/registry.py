"""Which substations the balancer routes to: the SUBSTATIONS setting plus the
ones registered and deregistered at run time."""
from __future__ import annotations

from typing import Callable

from gridcommon.settings import normalise_base_url
from load_balancer.poller import Poller
from load_balancer.view import GridView, SubstationSnapshot


def normalise_substation_url(raw: object) -> str:
    """A substation's base URL, normalised; ``ValueError`` saying what is wrong."""
    return normalise_base_url(raw, example="http://127.0.0.1:5011")


class SubstationRegistry:
    """Adds and removes substations; learns each one's id by polling it first."""

    def __init__(self, view: GridView, poller: Poller, on_removed: Callable[[str], None]) -> None:
        self._view = view
        self._poller = poller
        self._on_removed = on_removed

    def add_configured(self, urls: tuple[str, ...]) -> None:
        """URLs from the settings: tracked at once, routable after their first successful poll."""
        for url in urls:
            self._view.add_url(url)

    def register(self, raw_url: object) -> tuple[SubstationSnapshot, bool]:
        """Poll ``raw_url`` and add it; ``(entry, created)``.

        Raises ``ValueError`` for a malformed URL, :class:`~load_balancer.poller.PollError`
        when it cannot be polled, :class:`~load_balancer.view.SubstationConflict`
        when its id belongs to another registered URL.
        """
        url = normalise_substation_url(raw_url)
        substation_id, observation = self._poller.fetch(url)
        return self._view.add_polled(url, substation_id, observation)

    def deregister(self, substation_id: str) -> SubstationSnapshot | None:
        removed = self._view.remove(substation_id)
        if removed is not None:
            self._on_removed(substation_id)
        return removed
