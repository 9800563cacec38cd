from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Stack, start_stack


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
