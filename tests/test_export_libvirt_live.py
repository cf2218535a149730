"""The libvirt export run for real: a libvirt of the test's own starts it, and /proc checks it.

The test drives ``partition export`` as an operator would, then hands the domain
to libvirt's embedded QEMU driver (``qemu:///embed?root=DIR``: the driver runs
inside each ``virsh`` process, with its configuration, state and sockets under
DIR; no daemon, nothing shared with a system libvirt).  The guest is the TCG
partition of tests/test_apply_qemu.py (CPU 1, CPU 0 kept for the host) with
2 MiB pages, whose pool the test grows by what it needs and gives back.

A second test compares libvirt's QEMU command line for the export
(``virsh domxml-to-native qemu-argv``) with ``partition``'s own
(``partitioner.guest.argv``) for the same partition: every difference left must
be in ``EXPECTED_DIFFERENCES`` (and ``TCG_DIFFERENCES``) with its reason, and
every entry there must still be a difference.  A third does the same for a KVM
partition with a primary-display GPU, exported from a host tree
(tests/gpuhosts.py) and converted only, never started (``KVM_DIFFERENCES``):
libvirt's own line must carry ``host-phys-bits=on`` and ``x-vga=on``.  The last
shows, on a real QEMU, why ``cpu-pm=on`` is not exported as a
``<qemu:commandline>``.

A dynamic partition (rule 11) is exported, compared the same way
(``DYNAMIC_DIFFERENCES``), defined, started, and grown live by libvirt's own
``virsh update-memory-device``: the guest's console says the new size.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from gpuhosts import display_gpu, gpu_server
from guestimage import build_guest_initramfs, guest_kernel
from treebuilder import GiB, TreeBuilder

from partitioner.cpuset import CpuSet
from partitioner.guest.argv import guest_paths, qemu_argv
from partitioner.guest.caps import probe_qemu
from partitioner.guest.kvm import KvmCaps
from partitioner.guest.launch import thread_affinities
from partitioner.inventory import scan
from partitioner.kernel.root import HostRoot
from partitioner.manifest.loader import load
from partitioner.planning.planner import plan

pytestmark = pytest.mark.qemu

ROOT = HostRoot("/")
POOL_2M = "/sys/devices/system/node/node0/hugepages/hugepages-2048kB"
NAME = "lvx1"
MEMORY_MIB = 64
# A dynamic partition (rule 11): 1 of 2 vCPU slots, 128 MiB fixed of 2 MiB pages (the guest
# kernel needs that much to boot) with 32 MiB plugged by virtio-mem, up to 256 MiB (a room of
# one Linux memory block, 128 MiB: a smaller one the guest cannot use), one spare root port.
DYNAMIC_NAME = "lvd1"
DYNAMIC_BOUNDS = (
    "    max_cpus: 2\n    memory: 160MiB\n    min_memory: 128MiB\n    max_memory: 256MiB\n"
    "    hotplug_slots: 1\n"
)
GUEST_MARK = re.compile(r"partition-guest: cpus=(\d+) memtotal_kb=(\d+)")
CAP_SYS_RESOURCE = 24

# What the embedded driver's qemu.conf changes from Debian's defaults, and why.
QEMU_CONF = """\
# The test runs as root without the libvirt-qemu user's rights to its files.
user = "root"
group = "root"
# No AppArmor profile for a guest of a temporary directory.
security_driver = "none"
# No virtlogd: QEMU's output goes to a file under the embed root.
stdio_handler = "file"
# Pinning by affinity only, as partition's own `isolation: pinned`: libvirt would
# otherwise make cgroups under /machine on this machine, which are not the test's.
cgroup_controllers = [ ]
"""


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CPU affinity, hugepage pools)")
    _require_virsh()
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: one for the host, one for the partition")


@dataclass
class Lab:
    dir: Path
    kernel: Path
    initrd: Path

    @property
    def embed(self) -> str:
        return f"qemu:///embed?root={self.dir / 'libvirt'}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PARTITION_STATE_DIR": str(self.dir / "state"),
            "PARTITION_RUN_DIR": str(self.dir / "run"),
            "PARTITION_LOG_DIR": str(self.dir / "log"),
        }

    def site(self, name: str = NAME, bounds: str = "") -> Path:
        memory = f"    memory: {MEMORY_MIB}MiB\n" if not bounds else ""
        text = (
            "version: 1\n"
            'host:\n  reserve:\n    cpus: "0"\n    memory: 1GiB\n'
            "  accel: tcg\n  isolation: pinned\n  smt: share\n"
            f"partitions:\n  {name}:\n"
            f'    cpus: "1"\n{memory}    hugepages: 2MiB\n{bounds}'
            f"    boot:\n      kernel: {self.kernel}\n      initrd: {self.initrd}\n"
            "      cmdline: console=ttyS0 quiet panic=-1\n"
        )
        path = self.dir / f"{name}.yaml"
        path.write_text(text)
        return path

    def export(self, name: str = NAME, bounds: str = "") -> str:
        out = self.dir / "export"
        cp = subprocess.run(
            [sys.executable, "-m", "partitioner.cli.main", "export", str(self.site(name, bounds)),
             "--format", "libvirt", "--out", str(out)],
            env=self.env, capture_output=True, text=True, timeout=120,
            cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
        assert cp.returncode == 0, cp.stderr
        return (out / f"{name}.xml").read_text()

    def virsh(self, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cp = subprocess.run(
            ["virsh", "-q", "-c", self.embed, "; ".join(commands)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if check:
            assert cp.returncode == 0, f"virsh {commands}: {cp.stderr}"
        return cp

    def qemu_pid(self, name: str = NAME) -> int | None:
        pidfile = self.dir / "libvirt" / "run" / "qemu" / f"{name}.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    _require()
    # The export runs each domain as its partition's own user (a DAC seclabel, relabel=yes:
    # libvirt hands the domain's files to it), so the files it boots are the test's copies
    # (libvirt would relabel a system kernel), under directories that user may traverse.
    kernel = tmp_path / "img" / "vmlinuz"
    kernel.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(guest_kernel(), kernel)
    for d in (tmp_path.parent.parent, tmp_path.parent, tmp_path):
        d.chmod(d.stat().st_mode | 0o111)
    lab = Lab(tmp_path, kernel, build_guest_initramfs(tmp_path / "img"))
    etc = tmp_path / "libvirt" / "etc"
    etc.mkdir(parents=True)
    (etc / "qemu.conf").write_text(QEMU_CONF)
    yield lab
    for name in (NAME, DYNAMIC_NAME):
        pid = lab.qemu_pid(name)
        if pid is not None:
            lab.virsh(f"destroy {name}", check=False)
            _wait_gone(pid)


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), f"QEMU {pid} is still there after destroy"


@dataclass
class Pages:
    """2 MiB pages on node 0 the test added to the pool, and gives back.

    The pool is shared with whatever else runs on this machine: another
    program that shrinks it may take the free pages this test added.  ``top_up``
    adds what is missing again, and the start is retried when QEMU found too few.
    """

    added: int = 0

    def top_up(self, need: int) -> None:
        """Add ``need`` pages the first time (free pages already there are somebody else's);
        later, what is missing of them."""
        free = ROOT.read_int(f"{POOL_2M}/free_hugepages") or 0
        more = need if not self.added else need - free
        if more <= 0:
            return
        nr = ROOT.read_int(f"{POOL_2M}/nr_hugepages") or 0
        ROOT.write(f"{POOL_2M}/nr_hugepages", str(nr + more))
        got = (ROOT.read_int(f"{POOL_2M}/nr_hugepages") or 0) - nr
        self.added += max(0, got)
        if got < more:
            self.give_back()
            pytest.skip(f"the kernel found only {got} of {more} free 2 MiB pages on node 0")

    def give_back(self) -> None:
        if self.added:
            nr = ROOT.read_int(f"{POOL_2M}/nr_hugepages") or 0
            ROOT.write(f"{POOL_2M}/nr_hugepages", str(max(0, nr - self.added)))
            self.added = 0


def _can_raise_memlock() -> bool:
    """libvirt raises RLIMIT_MEMLOCK to unlimited for <locked/>: that needs CAP_SYS_RESOURCE,
    which this machine's container does not grant (partition's own QEMU locks under
    CAP_IPC_LOCK and needs no rlimit)."""
    status = Path("/proc/self/status").read_text()
    eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)  # type: ignore[union-attr]
    return bool(eff >> CAP_SYS_RESOURCE & 1)


def test_libvirt_runs_the_export_pinned_and_on_the_planned_pages(lab: Lab) -> None:
    xml = lab.export()
    # The TCG variant as this machine can run it: its console log in the test's directory,
    # and without <locked/> where libvirt cannot raise the memlock limit (see above).
    xml = xml.replace("/var/log/libvirt/qemu/", f"{lab.dir}/log-")
    if not _can_raise_memlock():
        assert "<locked />" in xml
        xml = xml.replace("<locked />", "")
    domain = lab.dir / "domain.xml"
    domain.write_text(xml)

    pages = Pages()
    try:
        lab.virsh(f"define {domain}")
        for _attempt in range(3):
            pages.top_up(MEMORY_MIB // 2)
            started = lab.virsh(f"start {NAME}", check=False)
            if started.returncode == 0 or "Cannot allocate memory" not in started.stderr:
                break
        assert started.returncode == 0, started.stderr
        pid = lab.qemu_pid()
        assert pid is not None, "libvirt says it started the domain but there is no QEMU"
        # Threads: the vCPU on host CPU 1, everything else of QEMU on the reserve (CPU 0).
        aff = thread_affinities(ROOT, pid)
        names = {tid: (Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()) for tid in aff}
        vcpus = [tid for tid, n in names.items() if re.fullmatch(r"CPU \d+/(TCG|KVM)", n)]
        assert len(vcpus) == 1, names
        assert aff[vcpus[0]] == CpuSet([1]), f"vCPU thread on {aff[vcpus[0]]}"
        # libvirt places its preallocation thread-context by node (node-affinity): it is
        # left on node 0's CPUs, the partition's among them, where partition pins it to the
        # reserve once memory is allocated.  It only sleeps after preallocation: the one
        # difference in placement, and said in docs/cli.md.
        others = {
            names[t]: str(c)
            for t, c in aff.items()
            if t not in vcpus and names[t] != "TC tc-ram-node0"
        }
        assert others and set(others.values()) == {"0"}, others
        # Memory: all of it in 2 MiB hugetlb pages of node 0, bound there.
        maps = Path(f"/proc/{pid}/numa_maps").read_text().splitlines()
        huge = [m for m in maps if "kernelpagesize_kB=2048" in m and " huge " in m]
        assert len(huge) == 1, huge
        assert "bind:0" in huge[0] and f"N0={MEMORY_MIB // 2}" in huge[0], huge[0]
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        assert re.search(rf"^Private_Hugetlb:\s+{MEMORY_MIB * 1024} kB", rollup, re.M), rollup

        lab.virsh(f"destroy {NAME}", check=False)
        _wait_gone(pid)
        lab.virsh(f"undefine {NAME}")
        assert "failed to get domain" in lab.virsh(f"dominfo {NAME}", check=False).stderr.lower()
    finally:
        pid = lab.qemu_pid()
        if pid is not None:
            lab.virsh(f"destroy {NAME}", check=False)
            _wait_gone(pid)
        pages.give_back()


def _guest_memtotal(log: Path, want: int | None = None, timeout: float = 180.0) -> int:
    """The MemTotal (kB) the test guest last said on its console; with ``want``, wait for it."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        seen = GUEST_MARK.findall(log.read_text(errors="replace") if log.exists() else "")
        if seen:
            last = int(seen[-1][1])
            if want is None or last == want:
                return last
        time.sleep(0.5)
    raise AssertionError(f"the guest said memtotal_kb={last}, not {want}, within {timeout}s")


def _settled_memtotal(log: Path, quiet: float = 5.0, timeout: float = 180.0) -> int:
    """The guest's MemTotal once its console has said nothing new for ``quiet`` seconds (it
    prints on every change: what virtio-mem plugged at start is onlined by then)."""
    _guest_memtotal(log, timeout=timeout)
    deadline = time.monotonic() + timeout
    size, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = log.stat().st_size
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return _guest_memtotal(log)
        time.sleep(0.5)
    raise AssertionError(f"the guest's console {log} did not settle within {timeout}s")


def _plugged_kib(lab: Lab, want: int, timeout: float = 120.0) -> None:
    """Wait until QEMU says the virtio-mem device has ``want`` KiB plugged.  Asked of QEMU
    (``query-memory-devices``): the embedded driver lives only as long as each ``virsh``, so
    libvirt's ``<current>`` misses the size-change events that come between them."""
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        cp = lab.virsh(
            f'qemu-monitor-command {DYNAMIC_NAME} \'{{"execute": "query-memory-devices"}}\''
        )
        [dev] = json.loads(cp.stdout)["return"]
        got = dev["data"]["size"] // 1024
        if got == want:
            return
        time.sleep(1)
    raise AssertionError(f"QEMU says {got} KiB plugged, not {want}, within {timeout}s")


def test_libvirt_runs_a_dynamic_partition_and_grows_it_live(lab: Lab) -> None:
    """The export of a dynamic partition (rule 11), as libvirt takes it: its command line
    differs from partition's own only as listed (DYNAMIC_DIFFERENCES), libvirt keeps its
    vCPU slots, ceiling and virtio-mem device, the guest boots with the fixed and plugged
    memory, and ``virsh update-memory-device`` grows it live: the guest says so."""
    xml = lab.export(DYNAMIC_NAME, DYNAMIC_BOUNDS)
    assert "<locked />" not in xml  # QEMU refuses virtio-mem under mem-lock, as argv knows
    xml = xml.replace("/var/log/libvirt/qemu/", f"{lab.dir}/log-")
    log = lab.dir / f"log-{DYNAMIC_NAME}.console.log"
    domain = lab.dir / "dynamic.xml"
    domain.write_text(xml)

    native = _native(lab.virsh(f"domxml-to-native qemu-argv {domain}"))
    result = plan(load(str(lab.site(DYNAMIC_NAME, DYNAMIC_BOUNDS))), scan(ROOT), {})
    paths = guest_paths(lab.dir / "run", lab.dir / "log", DYNAMIC_NAME)
    ours = _items(qemu_argv(result.placements[DYNAMIC_NAME], result, paths, probe_qemu()))
    static_smp = [e for e in EXPECTED_DIFFERENCES if e[1].startswith("^-smp ")]
    expected = [e for e in EXPECTED_DIFFERENCES if e not in static_smp]
    _check_differences(
        native, _items(native), ours, expected + TCG_DIFFERENCES + DYNAMIC_DIFFERENCES
    )
    for item in ("-overcommit mem-lock=off", f"-m maxmem={256 << 20} size={128 << 20} slots=1"):
        assert item in _items(native) and item in ours, item

    pages = Pages()
    try:
        lab.virsh(f"define {domain}")
        kept = ET.fromstring(lab.virsh(f"dumpxml {DYNAMIC_NAME}").stdout)
        vcpu = kept.find("vcpu")
        assert vcpu is not None and (vcpu.text, vcpu.get("current")) == ("2", "1")
        assert [v.get("enabled") for v in kept.findall("vcpus/vcpu")] == ["yes", "no"]
        [vmem] = kept.findall("devices/memory[@model='virtio-mem']")
        assert vmem.findtext("target/size") == str(128 * 1024)
        assert vmem.findtext("target/requested") == str(32 * 1024)
        assert len(kept.findall("devices/controller[@model='pcie-root-port']")) == 1
        for _attempt in range(3):
            # 64 pages fixed, 16 plugged at start, 48 more for the growth
            pages.top_up(128)
            started = lab.virsh(f"start {DYNAMIC_NAME}", check=False)
            if started.returncode == 0 or "Cannot allocate memory" not in started.stderr:
                break
        assert started.returncode == 0, started.stderr
        pid = lab.qemu_pid(DYNAMIC_NAME)
        assert pid is not None
        _plugged_kib(lab, 32 * 1024)
        kb0 = _settled_memtotal(log)
        lab.virsh(f"update-memory-device {DYNAMIC_NAME} --node 0 --requested-size 128MiB --live")
        _plugged_kib(lab, 128 * 1024)
        _guest_memtotal(log, kb0 + 96 * 1024)
        lab.virsh(f"destroy {DYNAMIC_NAME}", check=False)
        _wait_gone(pid)
        lab.virsh(f"undefine {DYNAMIC_NAME}")
    finally:
        pid = lab.qemu_pid(DYNAMIC_NAME)
        if pid is not None:
            lab.virsh(f"destroy {DYNAMIC_NAME}", check=False)
            _wait_gone(pid)
        pages.give_back()


# -- libvirt's command line against partition's own ----------------------------------------

# Each entry: which side has the item ("libvirt" or "partition"), a pattern on the
# normalised item (see _items), and why the two differ.  The test fails on any
# difference not matched here, and on any entry that matches nothing.
EXPECTED_DIFFERENCES: list[tuple[str, str, str]] = [
    ("libvirt", r"^-object secret ", "libvirt's master key for secrets it passes to QEMU"),
    ("libvirt", r"^-uuid ", "libvirt names each domain by a UUID; partition by its name"),
    ("libvirt", r"^-rtc base=utc$", "libvirt states the RTC base that QEMU defaults to anyway"),
    (
        "libvirt",
        r"^-no-shutdown$",
        "libvirt keeps QEMU after a guest power-off to report it; partition lets QEMU exit",
    ),
    (
        "libvirt",
        r"^-boot strict=on$",
        "libvirt's boot order is strict; partition leaves QEMU's default (direct kernel boot here)",
    ),
    (
        "libvirt",
        r"^-audiodev ",
        "libvirt declares a null audio backend; -nodefaults already gives none",
    ),
    (
        "libvirt",
        r"^-chardev pty ",
        "the export's console is a pty (virsh console); partition's is a UNIX socket (partition console)",
    ),
    (
        "partition",
        r"^-chardev socket logappend=on logfile=\S+ server=on wait=off$",
        "partition's console: a UNIX socket logged to a file; libvirt's is a pty",
    ),
    (
        "libvirt",
        r"^-device isa-serial index=0$",
        "libvirt spells the serial port as a device; partition as -serial",
    ),
    ("partition", r"^-serial ", "partition connects the serial port with -serial chardev:"),
    ("partition", r"^-pidfile ", "libvirt keeps the pid itself"),
    (
        "libvirt",
        r"^-machine .*type=pc-q35-\d",
        "libvirt expands q35 into the versioned machine type of this QEMU",
    ),
    ("partition", r"^-machine .*type=q35", "partition asks for the newest q35 of the QEMU it runs"),
    (
        "libvirt",
        r"^-machine .*usb=off",
        "libvirt turns the machine's USB off (<controller type='usb' model='none'/>); q35 has none by default",
    ),
    (
        "libvirt",
        r"^-object thread-context node-affinity=0$",
        "libvirt places the preallocation threads on the memory's node (all its CPUs, the reserve among them)",
    ),
    (
        "partition",
        r"^-object thread-context( cpu-affinity=[0-9-]+)+$",
        "partition places them on the partition's own CPUs on that node only",
    ),
    ("libvirt", r"^-name debug-threads=on guest=\S+$", "libvirt spells the name guest=NAME"),
    ("partition", r"^-name \S+ debug-threads=on$", "partition spells it NAME,debug-threads=on"),
    (
        "libvirt",
        r"^-smp \d+ cores=\d+ dies=1 sockets=\d+ threads=\d+$",
        "libvirt states dies=1 and no maxcpus (the same topology)",
    ),
    (
        "partition",
        r"^-smp (\d+) cores=\d+ maxcpus=\1 sockets=\d+ threads=\d+$",
        "partition states maxcpus (the same topology)",
    ),
]

# The TCG partition's own differences.
TCG_DIFFERENCES: list[tuple[str, str, str]] = [
    (
        "libvirt",
        r"^-accel tcg tb-size=256$",
        "libvirt has no spelling for thread=multi, which QEMU uses by default for x86 on x86",
    ),
    (
        "partition",
        r"^-accel tcg tb-size=256 thread=multi$",
        "partition says thread=multi (one host thread per vCPU) explicitly",
    ),
    (
        "libvirt",
        r"^-cpu max migratable=off$",
        "<cpu mode='maximum'> has no vendor; the guest sees TCG's default vendor",
    ),
    (
        "partition",
        r"^-cpu max vendor=GenuineIntel$",
        "partition shows the guest an Intel vendor so that it sees SMT threads (argv.py)",
    ),
]


# A dynamic partition's own differences (with the static -smp entries left out).
DYNAMIC_DIFFERENCES: list[tuple[str, str, str]] = [
    (
        "libvirt",
        r"^-smp (\d+) cores=\d+ dies=1 maxcpus=\d+ sockets=\d+ threads=\d+$",
        "libvirt states dies=1 and the present vCPUs without cpus= (the same slots)",
    ),
    (
        "partition",
        r"^-smp cores=\d+ cpus=\d+ maxcpus=\d+ sockets=\d+ threads=\d+$",
        "partition says cpus=N of maxcpus=M",
    ),
    (
        "libvirt",
        r"^-numa node cpus=[0-9,-]+ nodeid=\d+$",
        "libvirt puts every slot of the cell, present or not, in -numa node cpus=",
    ),
    ("partition", r"^-numa node nodeid=\d+$", "partition puts each slot on its node by -numa cpu"),
    (
        "partition",
        r"^-numa cpu core-id=\d+ node-id=\d+ socket-id=\d+ thread-id=\d+$",
        "the same slots and nodes, one by one (see libvirt's -numa node cpus=)",
    ),
    (
        "libvirt",
        r"^-device pcie-root-port addr=1\.0 chassis=1 port=16$",
        "libvirt gives the spare root port a fixed slot of pcie.0 (addr=); partition lets "
        "QEMU take the next free one",
    ),
    ("partition", r"^-device pcie-root-port chassis=1 port=16$", "the same port without addr="),
    (
        "libvirt",
        r"^-device virtio-mem-pci addr=16\.0 ",
        "the export places the virtio-mem device on pcie.0 at a fixed slot (0x10), so that "
        "libvirt does not put it into the spare root port; partition's QEMU puts it on "
        "pcie.0 too, at the next free slot",
    ),
    (
        "partition",
        r"^-device virtio-mem-pci block-size=\d+ node=\d+ prealloc=on requested-size=\d+$",
        "the same device without addr=",
    ),
]


def _kv(text: str) -> list[tuple[str, str]]:
    out = []
    for item in text.replace(",,", "\0").split(","):
        k, _, v = item.partition("=")
        out.append((k, v.replace("\0", ",")))
    return out


_BYTES = {"k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
# Keys whose values are names of other objects: the two sides name things differently.
_NAME_KEYS = {"id", "memdev", "prealloc-context", "chardev", "path", "fd", "bus", "file"}


def _value(key: str, v: object) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    s = str(v)
    if key in ("size", "hugetlbsize", "block-size", "requested-size") or key.endswith(
        ".pci-hole64-size"
    ):
        return str(int(s[:-1]) * _BYTES[s[-1]]) if s[-1:] in _BYTES else s
    if key == "port":
        return str(int(s, 0))  # libvirt's JSON 16, partition's 0x10
    if key == "addr":
        # A PCI slot.function: libvirt's "0x0.0x1" and "0x1", partition's "0.1".
        slot, _, fn = s.partition(".")
        return f"{int(slot, 16)}.{int(fn or '0', 16)}"
    return s


def _items(argv: list[str]) -> list[str]:
    """Each option with its value as ``-flag [type] k=v k=v`` (keys sorted, names of other
    objects dropped, sizes in bytes, JSON and key=value spellings alike)."""
    items = []
    i = 1  # argv[0] is the binary
    while i < len(argv):
        flag = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None
        i += 2 if value is not None else 1
        if value is None:
            items.append(flag)
            continue
        if flag == "-m" and "=" in value:
            # size=FIXED,slots=K,maxmem=MAX (a partition with virtio-mem)
            pairs = sorted(f"{k}={_value('size', v)}" for k, v in _kv(value))
            items.append(" ".join(["-m", *pairs]))
            continue
        if flag == "-m":
            items.append(f"-m {int(value) << 20 if value.isdigit() else _value('size', value)}")
            continue
        if flag in ("-kernel", "-initrd", "-append", "-uuid", "-pidfile", "-serial"):
            items.append(f"{flag} {value}")
            continue
        pairs = list(json.loads(value).items()) if value.startswith("{") else _kv(value)
        kind = ""
        rest = []
        for k, v in pairs:
            if k in ("qom-type", "driver") or (v == "" and not kind and not rest):
                kind = str(v) if v != "" else k
            elif k not in _NAME_KEYS:
                rest.append(f"{k}={_value(k, v)}")
        if flag == "-name":
            kind = "" if kind.startswith("guest=") else kind
        if flag == "-machine":
            rest.append(f"type={kind}")
            kind = ""
        items.append(" ".join(x for x in (flag, kind, *sorted(rest)) if x))
    return items


def _native(virsh: subprocess.CompletedProcess[str]) -> list[str]:
    """libvirt's command line from ``domxml-to-native``, without the environment before it."""
    native = shlex.split(virsh.stdout.strip())
    while native and "=" in native[0] and not native[0].startswith("/"):
        native.pop(0)
    return native


def _check_differences(
    native: list[str], theirs: list[str], ours: list[str], expected: list[tuple[str, str, str]]
) -> None:
    """Every item only one side has matches an entry of ``expected`` of that side, and every
    entry still matches something."""
    only_theirs = [x for x in theirs if x not in ours]
    only_ours = [x for x in ours if x not in theirs]
    unexplained = []
    used: set[int] = set()
    for side, items in (("libvirt", only_theirs), ("partition", only_ours)):
        for item in items:
            hits = [
                k for k, (s, pattern, _) in enumerate(expected)
                if s == side and re.search(pattern, item)
            ]  # fmt: skip
            if hits:
                used.update(hits)
            else:
                unexplained.append(f"only in {side}'s command line: {item}")
    stale = [
        f"{s}: {pattern} ({why}) no longer differs"
        for k, (s, pattern, why) in enumerate(expected)
        if k not in used
    ]
    assert not unexplained, "\n".join([*unexplained, "", "libvirt: " + " ".join(native)])
    assert not stale, "\n".join(stale)


def test_libvirt_command_line_differs_from_partitions_only_as_explained(lab: Lab) -> None:
    xml_path = lab.dir / "domain.xml"
    xml_path.write_text(lab.export())
    native = _native(lab.virsh(f"domxml-to-native qemu-argv {xml_path}"))
    theirs = _items(native)

    manifest = load(str(lab.site()))
    placed = plan(manifest, scan(ROOT), {})
    p = placed.placements[NAME]
    paths = guest_paths(lab.dir / "run", lab.dir / "log", NAME)
    ours = _items(qemu_argv(p, placed, paths, probe_qemu()))

    _check_differences(native, theirs, ours, EXPECTED_DIFFERENCES + TCG_DIFFERENCES)
    # What both must carry, checked by content rather than by absence of a difference.
    for item in (
        "-overcommit mem-lock=on",
        "-display none",
        "-nodefaults",
        "-no-user-config",
        f"-m {MEMORY_MIB << 20}",
    ):
        assert item in theirs and item in ours, item
    backend = [x for x in theirs if x.startswith("-object memory-backend-memfd")]
    assert backend == [x for x in ours if x.startswith("-object memory-backend-memfd")], backend
    assert "hugetlbsize=2097152" in backend[0] and "policy=bind" in backend[0]


# -- a KVM partition with a primary-display GPU: converted, not started ---------------------

# The RTX 3090-like workstation of tests/test_native.py's golden command lines.
KVM_SITE = """\
version: 1
host:
  reserve: {cpus: 2, memory: 8GiB}
  accel: kvm
  isolation: pinned
partitions:
  ws:
    cpus: 4
    memory: 16GiB
    hugepages: none
    devices: [{pci: "30:00.0", primary_display: true, rom: /srv/roms/3090.rom}]
"""

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

# The KVM partition's own differences.
KVM_DIFFERENCES: list[tuple[str, str, str]] = [
    (
        "partition",
        r"^-overcommit cpu-pm=on mem-lock=on$",
        "cpu-pm=on is not exported: libvirt 9.0 has no element for it, and a <qemu:commandline> "
        "-overcommit after libvirt's own turns mem-lock off (docs/decisions.md)",
    ),
    (
        "libvirt",
        r"^-overcommit mem-lock=on$",
        "libvirt's <locked/>, without cpu-pm (see partition's -overcommit)",
    ),
    (
        "libvirt",
        r"^-cpu host host-cache-info=on host-phys-bits=on kvm-hint-dedicated=on l3-cache=off "
        r"migratable=off$",
        "libvirt adds l3-cache=off to <cache mode='passthrough'/>; with host-cache-info=on "
        "QEMU takes the guest's cache leaves from the host CPU",
    ),
    (
        "partition",
        r"^-cpu host host-cache-info=on host-phys-bits=on kvm-hint-dedicated=on migratable=off$",
        "the same -cpu without l3-cache=off",
    ),
    (
        "libvirt",
        r"^-device pcie-root-port addr=1\.0 chassis=1 port=16$",
        "libvirt gives each root port a fixed slot of pcie.0 (addr=); partition lets QEMU "
        "take the next free one",
    ),
    ("partition", r"^-device pcie-root-port chassis=1 port=16$", "the same port without addr="),
]


def _require_virsh() -> None:
    for tool, package in (
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("virsh", "libvirt-clients"),
    ):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {package})")
    if not Path(
        "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so"
    ).exists():
        pytest.skip(
            "libvirt's QEMU driver is not installed (apt-get install libvirt-daemon-driver-qemu)"
        )


def test_libvirt_command_line_of_a_kvm_gpu_partition(tree: TreeBuilder, tmp_path: Path) -> None:
    """libvirt's own command line for the exported KVM workstation carries host-phys-bits=on
    and x-vga=on on the GPU; what else differs from partition's is listed with its reason.
    ``domxml-to-native`` starts nothing, so this KVM domain converts on a TCG-only machine."""
    _require_virsh()
    gpu_server(tree, gpus=0, bar1=128 * GiB, phys_bits=46)
    gpu = display_gpu(tree, 0x30, 70)
    tree.build()
    site = tmp_path / "site.yaml"
    site.write_text(KVM_SITE)
    out = tmp_path / "export"
    cp = subprocess.run(
        [sys.executable, "-m", "partitioner.cli.main", "--host-root", str(tree.root),
         "export", str(site), "--format", "libvirt", "--out", str(out)],
        env={**os.environ, "PARTITION_STATE_DIR": str(tmp_path / "state")},
        capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    etc = tmp_path / "libvirt" / "etc"
    etc.mkdir(parents=True)
    (etc / "qemu.conf").write_text(QEMU_CONF)
    virsh = subprocess.run(
        ["virsh", "-q", "-c", f"qemu:///embed?root={tmp_path / 'libvirt'}",
         f"domxml-to-native qemu-argv {out / 'ws.xml'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if virsh.returncode != 0 and "kvm" in virsh.stderr.lower() and "support" in virsh.stderr:
        pytest.skip(f"this libvirt converts no KVM domain here: {virsh.stderr.strip()}")
    assert virsh.returncode == 0, virsh.stderr
    native = _native(virsh)
    theirs = _items(native)

    # partition's own line for the same plan, on a KVM that lets the guest keep HLT (as on the
    # real host the export is made for): cpu-pm=on is then the one setting libvirt lacks.
    result = plan(load(str(site)), scan(HostRoot(tree.root)), {})
    caps = replace(probe_qemu(), kvm=KvmCaps(available=True, disable_exits=0b1110, max_vcpus=1024))
    paths = guest_paths(tmp_path / "run", tmp_path / "log", "ws")
    ours = _items(qemu_argv(result.placements["ws"], result, paths, caps))

    _check_differences(native, theirs, ours, EXPECTED_DIFFERENCES + KVM_DIFFERENCES)
    # By content: libvirt's own QEMU gets the host's address width and the GPU's VGA ranges.
    cpu = [x for x in theirs if x.startswith("-cpu ")]
    assert len(cpu) == 1 and "host-phys-bits=on" in cpu[0].split(), cpu
    vga = [x for x in theirs if x.startswith("-device vfio-pci") and f"host={gpu}" in x]
    assert len(vga) == 1 and "x-vga=on" in vga[0].split(), vga
    audio = [x for x in theirs if x.startswith("-device vfio-pci") and f"host={gpu}" not in x]
    assert len(audio) == 1 and "x-vga" not in audio[0], audio
    assert "host-phys-bits=on" in next(x for x in ours if x.startswith("-cpu ")).split()


def _locked_kib(overcommit: list[str], tmp_path: Path) -> int:
    """VmLck of a paused TCG QEMU started with these -overcommit options (it is then stopped)."""
    pidfile = tmp_path / "qemu.pid"
    args = [a for o in overcommit for a in ("-overcommit", o)]
    subprocess.run(
        ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg,tb-size=16", "-m", "32M",
         "-nodefaults", "-display", "none", "-S", *args, "-daemonize",
         "-pidfile", str(pidfile)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    pid = int(pidfile.read_text())
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"^VmLck:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
    finally:
        os.kill(pid, 15)
        _wait_gone(pid)


def test_a_second_overcommit_turns_the_memory_lock_off(tmp_path: Path) -> None:
    """Why cpu-pm=on is not exported as <qemu:commandline>: libvirt puts those arguments after
    its own -overcommit mem-lock=on, and QEMU (7.2) reads each -overcommit whole, so the
    later -overcommit cpu-pm=on leaves the guest's memory unlocked (docs/decisions.md)."""
    _require_virsh()
    if os.geteuid() != 0:
        pytest.skip("needs root to lock QEMU's memory")
    golden = Path(__file__).parent / "golden" / "export" / "tcg-small.xml"
    xml = golden.read_text()
    assert "<locked />" in xml and "qemu:" not in xml
    xml = xml.replace("<domain ", f'<domain xmlns:qemu="{QEMU_NS}" ', 1).replace(
        "</domain>",
        '<qemu:commandline><qemu:arg value="-overcommit"/><qemu:arg value="cpu-pm=on"/>'
        "</qemu:commandline></domain>",
    )
    domain = tmp_path / "domain.xml"
    domain.write_text(xml)
    etc = tmp_path / "libvirt" / "etc"
    etc.mkdir(parents=True)
    (etc / "qemu.conf").write_text(QEMU_CONF)
    virsh = subprocess.run(
        ["virsh", "-q", "-c", f"qemu:///embed?root={tmp_path / 'libvirt'}",
         f"domxml-to-native qemu-argv {domain}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert virsh.returncode == 0, virsh.stderr
    native = _native(virsh)
    overcommit = [native[i + 1] for i, a in enumerate(native[:-1]) if a == "-overcommit"]
    assert overcommit == ["mem-lock=on", "cpu-pm=on"], overcommit
    assert _locked_kib(["mem-lock=on"], tmp_path) >= 32 * 1024
    assert _locked_kib(["mem-lock=on,cpu-pm=on"], tmp_path) >= 32 * 1024
    assert _locked_kib(overcommit, tmp_path) == 0
