"""Fixtures for the multi-host tests (marker `fleet`): a NATS cluster, nested Docker engines as
hosts in one Swarm, a local registry.

Every test here is marked `fleet`. One that needs what this machine lacks (a Docker engine, the
node image, root) skips with the reason shown, except in CI (`CI=true`), where it fails.
"""

from __future__ import annotations

import os

import pytest

FLEET_TIMEOUT_S = 300
"""A fleet test's bound unless it sets its own: its module's hosts, images and servers come up
inside its first test's time (the suite's default of 120 s is for one stack)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/fleet/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.fleet)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(FLEET_TIMEOUT_S))


def need(problem: str | None) -> None:
    """Skip (fail in CI) when `problem` says why the test cannot run here."""
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"needed in CI: {problem}")
    pytest.skip(problem)
