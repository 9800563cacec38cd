from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Stack, start_stack
from tests.postgres_support import ChargeRecords, PostgresServer, start_postgres


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Start real stacks as processes; every one is stopped when the test ends."""
    stacks: list[Stack] = []

    def factory(**kwargs) -> Stack:
        stack = start_stack(tmp_path / f"logs-{len(stacks)}", **kwargs)
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stack.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL 15 server of the test run's own (tests/postgres_support.py), started once."""
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def charge_records(request: pytest.FixtureRequest) -> ChargeRecords:
    """The charge API's records on each database it supports: every test that takes this runs on both."""
    if request.param == "postgresql":
        return ChargeRecords("postgresql", request.getfixturevalue("postgres"))
    return ChargeRecords("sqlite")
