"""Fixtures for tests that run INSIDE the emulated VT-d server (see tests/test_inside.py).

The server's init sets ``$TESTBED`` (the topology's name) and ``$TESTBED_OUT``
(a directory shared writable with the host).  Outside a testbed these tests
skip: the host run ignores this directory anyway (pyproject's addopts).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The project and tests/ on the path whatever the invoking directory: the host's
# tree is mounted read-only at the same path, nothing is installed in there.
_TESTS = Path(__file__).resolve().parents[1]
for p in (str(_TESTS.parent), str(_TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from partitioner.inventory.model import Host  # noqa: E402
from partitioner.kernel.root import HostRoot  # noqa: E402
from partitioner.run import run  # noqa: E402
from partitioner.testbed.topology import Topology, load_topology  # noqa: E402

INSIDE = "TESTBED" in os.environ and os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if INSIDE:
        return
    skip = pytest.mark.skip(reason="runs inside the emulated server: pytest tests/test_inside.py")
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(Path(__file__).parent):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def topology() -> Topology:
    """The topology this server was booted with (its name is in $TESTBED)."""
    return load_topology(os.environ.get("TESTBED", "numa"))


@pytest.fixture(scope="session")
def live_root() -> HostRoot:
    return HostRoot("/")


@pytest.fixture(scope="session")
def live_host(live_root: HostRoot) -> Host:
    """The inventory of the emulated server, scanned once (a scan under TCG is not free)."""
    from partitioner.inventory import scan

    return scan(live_root)


@pytest.fixture(scope="session")
def testbed_out() -> Path:
    """The directory shared writable with the host: files put here come out."""
    return Path(os.environ.get("TESTBED_OUT", "/run/testbed-out"))


@pytest.fixture(scope="module")
def nic_drivers() -> Iterator[None]:
    """e1000e and e1000 loaded, as udev would have at boot (there is none in the server),
    so that "given back to e1000e" can be seen; unloaded after if they were not there."""
    root = HostRoot("/")
    loaded = [m for m in ("e1000e", "e1000") if not root.exists(f"/sys/module/{m}")]
    for module in loaded:
        run(["modprobe", module], timeout=120)
    yield
    # Leave the server's drivers as they were found, for the tests that run after.
    for module in loaded:
        run(["modprobe", "-r", module], timeout=120, check=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "incremental: the module's tests build on each other; after one fails, skip"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if "incremental" in item.keywords and rep.when == "call" and rep.failed:
        item.parent._failed_before = item.name  # type: ignore[union-attr]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "incremental" in item.keywords:
        before = getattr(item.parent, "_failed_before", None)
        if before is not None:
            pytest.skip(f"{before} failed, and this test builds on it")
