"""A partition's QEMU in a cgroup of its own, on this machine, with a real TCG guest.

The site says ``isolation: pinned`` (this machine's other processes are its
operator's): only the partition's own QEMU is placed.  Checked from the kernel:
the cgroup's ``vcpu0`` holds exactly the vCPU thread, ``emulator`` every other
thread of that QEMU, and after ``destroy`` the cgroup is gone and every other
cgroup, and PID 1's membership, is as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_apply_qemu import Site, site  # noqa: F401  (the fixture)

from partitioner.isolation.cgroup import find_hierarchy, members
from partitioner.kernel.root import HostRoot

pytestmark = pytest.mark.qemu
ROOT = HostRoot("/")


def _cgroups(mount: str, skip: str) -> dict[str, str]:
    """Every cgroup directory of the hierarchy but ours -> its cpus (where it has them)."""
    out = {}
    for d, dirs, _ in os.walk(mount):
        if d.startswith(skip):
            dirs[:] = []
            continue
        out[d] = Path(d, "cpuset.cpus").read_text() if Path(d, "cpuset.cpus").exists() else ""
    return out


def test_a_partitions_qemu_has_its_own_cgroup_vcpus_and_emulator_apart(
    site: Site,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = find_hierarchy(ROOT)
    if h is None:
        pytest.skip("no cgroup hierarchy mounted")
    base_name = f"partition-test-{os.getpid()}"
    monkeypatch.setenv("PARTITION_CGROUP", base_name)
    base = f"{h.mount}/{base_name}"
    before = _cgroups(h.mount, base)
    pid1_before = Path("/proc/1/cgroup").read_text()

    m = site.manifest("site", {"p1": site.guest()})
    cp = site.run("apply", str(m))
    assert cp.returncode == 0, cp.stderr
    st = site.status()["p1"]
    pid, vcpu = st["pid"], st["vcpu_threads"]["0"]
    threads = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    got = members(ROOT, f"{base}/p1")
    assert got["vcpu0"] == {vcpu}
    # Threads QEMU started after placement land with their creator: the emulator side.
    assert got["emulator"] == threads - {vcpu}
    assert set(got) == {"vcpu0", "emulator"}
    if h.cpuset:
        assert Path(f"{base}/p1/vcpu0/cpuset.cpus").read_text().strip() == "1"
        assert Path(f"{base}/p1/emulator/cpuset.cpus").read_text().strip() == "0"
    assert Path("/proc/1/cgroup").read_text() == pid1_before

    cp = site.run("destroy", "--all", "--timeout", "5")
    assert cp.returncode == 0, cp.stderr
    assert not Path(base).exists(), "the partition's cgroup is left behind"
    assert _cgroups(h.mount, base) == before
    assert Path("/proc/1/cgroup").read_text() == pid1_before
