"""The proof on a real kernel: the `numa` test bed boots with the kernel arguments that
`partition host setup --dry-run` compiles for tests/manifests/hostboot-numa.yaml, runs the
compiled early-binding script before any NIC driver loads, and tests/inside/hostboot_inside.py
checks inside that the machine came up into the site's layout.  One boot of its own.

The site is compiled against the real snapshot of the `numa` server
(tests/fixtures/hosts/testbed-numa) with what this boot adds written on top: 1 GiB pages
(the CPU model gets pdpe1gb) and 3 GiB on node 1 for fw0's 1 GiB page.  With 2 GiB on
node 1 the kernel reserved no 1 GiB page there (pool 0, seen in this test): with 3 GiB in
all, q35 puts 2 GiB below the PCI hole, so node 1 was 1-2 GiB (where the initramfs is
loaded) and 4-5 GiB (whose top the kernel takes for node 1's own structures), most likely
leaving no whole aligned free GiB.  With 3 GiB on node 1 it reserves it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from test_hostboot import INTEL_CPUINFO, SNAPSHOT, run
from treebuilder import GiB, TreeBuilder

from partitioner.testbed.initramfs import default_kernel, kernel_version
from partitioner.testbed.server import TestbedServer, once_more_after_a_fault
from partitioner.testbed.topology import load_topology

pytestmark = [pytest.mark.testbed, pytest.mark.qemu]

PROJECT = Path(__file__).resolve().parents[1]
SITE = PROJECT / "tests" / "manifests" / "hostboot-numa.yaml"
INIT_TOP = "/etc/initramfs-tools/scripts/init-top/partition-vfio"
TIMEOUT = float(os.environ.get("PARTITION_TESTBED_TIMEOUT", "1500"))


def topology():  # type: ignore[no-untyped-def]
    """The numa preset with 1 GiB pages and the memory fw0's page needs on node 1, and no
    hugepages of its own: every page in this boot is one the site's arguments reserved."""
    numa = load_topology("numa")
    nodes = tuple(
        replace(n, hugepages_2m=0, memory_bytes=3 * GiB if n.id == 1 else n.memory_bytes)
        for n in numa.nodes
    )
    return replace(numa, cpu=replace(numa.cpu, model=numa.cpu.model + ",+pdpe1gb"), nodes=nodes)


def host_tree(tmp_path: Path, release: str) -> Path:
    """The snapshot of the numa server as this boot makes it: node 1 with 3 GiB, 1 GiB pages."""
    dest = tmp_path / "host"
    shutil.copytree(SNAPSHOT, dest, symlinks=True)
    t = TreeBuilder(dest)
    t.file("/proc/cpuinfo", INTEL_CPUINFO.replace(" lm ", " pdpe1gb lm "))
    t.file("/proc/sys/kernel/osrelease", release + "\n")
    kb = 3 * GiB // 1024
    t.file(
        "/sys/devices/system/node/node1/meminfo",
        f"Node 1 MemTotal:       {kb} kB\nNode 1 MemFree:        {kb - 200 * 1024} kB\n",
    )
    for node in (0, 1):
        for name in ("nr_hugepages", "free_hugepages", "surplus_hugepages"):
            base = f"/sys/devices/system/node/node{node}/hugepages"
            t.file(f"{base}/hugepages-1048576kB/{name}", "0\n")
            t.file(f"{base}/hugepages-2048kB/{name}", "0\n")
    return dest


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (the emulated server shares the host's / as root)"
    if shutil.which("qemu-system-x86_64") is None:
        return "needs qemu-system-x86_64"
    if not list(Path("/boot").glob("vmlinuz-*")) or not Path("/bin/busybox").exists():
        return "needs linux-image-amd64 and busybox-static"
    return None


def test_the_server_boots_into_the_sites_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    release = kernel_version(default_kernel())
    host = host_tree(tmp_path, release)
    rc, out, err = run(
        capsys, "--host-root", str(host), "--json", "host", "setup", str(SITE), "--dry-run",
        "--root", str(tmp_path / "target"),
    )  # fmt: skip
    assert rc == 0, err
    setup = json.loads(out)
    args = setup["kernel_args"]
    assert "hugepagesz=1G" in args and "hugepages=1:1" in args
    script = next(f["content"] for f in setup["files"] if f["path"] == INIT_TOP)
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "partition-vfio").write_text(script)
    cpus = sorted(
        int(c) for a in args if a.startswith("nohz_full=") for c in a.split("=", 1)[1].split(",")
    )
    (outdir / "expect.json").write_text(
        json.dumps(
            {
                "kernel_args": args,
                "partition_cpus": cpus,
                "hugepages": setup["hugepages"],
                "devices": [d["address"] for d in setup["devices"]],
            }
        )
    )
    # The initramfs's init-top step first (nothing has loaded a NIC driver yet: the test
    # bed has no udev), then the checks.
    job = (
        'sh "$TESTBED_OUT/partition-vfio" && exec "$0" -m pytest tests/inside/hostboot_inside.py '
        '-p no:cacheprovider -o addopts=-ra --durations=0 --junitxml="$TESTBED_OUT/hostboot.xml"'
    )
    log = tmp_path / "inside.log"
    servers: list[TestbedServer] = []

    def boot_and_check() -> int:
        # A fresh server each time: what the job changed went with the one before.
        (outdir / "hostboot.xml").unlink(missing_ok=True)
        with (
            log.open("a") as stream,
            TestbedServer(
                topology(),
                ["sh", "-c", job, sys.executable],
                timeout=TIMEOUT,
                cwd=str(PROJECT),
                out_dir=outdir,
                stream=stream,
                append=args,
            ) as tb,
        ):
            servers.append(tb)
            return tb.wait()

    rc = once_more_after_a_fault(boot_and_check, sys.stderr, "booting into the layout again")
    tb = servers[-1]
    text = log.read_text(errors="replace")
    tail = "\n".join(text.splitlines()[-80:])
    report = outdir / "hostboot.xml"
    assert report.exists(), f"no report from inside (exit {rc}):\n{tail}"
    cases = list(ET.parse(report).getroot().iter("testcase"))
    assert len(cases) >= 6, tail
    bad = [
        (tc.get("name"), child.tag, (child.get("message") or "") + (child.text or "")[-1500:])
        for tc in cases
        for child in tc
        if child.tag in ("failure", "error", "skipped")
    ]
    assert not bad, "\n\n".join(f"{n} ({k}):\n{m}" for n, k, m in bad)
    assert rc == 0, tail
    print(f"booted in {tb.boot_seconds:.0f}s, {tb.total_seconds:.0f}s in all; inside:\n{tail}")
