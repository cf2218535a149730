"""Where the kernel keeps what the partitioner reads and writes: every /sys, /proc and /dev path, built here.

Paths are kernel paths (absolute, as the kernel names them); a :class:`HostRoot`
turns them into files on this machine.  No other module spells ``/sys/...``,
``/proc/...`` or ``/dev/...`` (the generated boot-time scripts of ``host setup``
aside: they are shell text for another machine, not paths read here).
"""

from __future__ import annotations

CPU = "/sys/devices/system/cpu"
NODE = "/sys/devices/system/node"
HUGEPAGES = "/sys/kernel/mm/hugepages"
PCI_DEVICES = "/sys/bus/pci/devices"
PCI_DRIVERS = "/sys/bus/pci/drivers"
PCI_DRIVERS_PROBE = "/sys/bus/pci/drivers_probe"
IOMMU_GROUPS = "/sys/kernel/iommu_groups"
CLASS_NET = "/sys/class/net"
CLASS_BLOCK = "/sys/class/block"
VIRTIO_DEVICES = "/sys/bus/virtio/devices"
FS_VIRTIOFS = "/sys/fs/virtiofs"  # a virtiofs tag and its virtio device (Linux 6.10 and later)
CLASS_ISCSI_CONNECTION = "/sys/class/iscsi_connection"
DEV_BLOCK = "/sys/dev/block"
WORKQUEUE_CPUMASK = "/sys/devices/virtual/workqueue/cpumask"
CPU_ISOLATED = f"{CPU}/isolated"
CPU_NOHZ_FULL = f"{CPU}/nohz_full"
CPU_ONLINE = f"{CPU}/online"
CLASS_IOMMU = "/sys/class/iommu"
VFIO_UNSAFE_INTERRUPTS = "/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts"


def irq(n: int | str, leaf: str = "") -> str:
    """An interrupt's directory in /sys/kernel/irq, or a file in it (``actions``)."""
    return f"/sys/kernel/irq/{n}/{leaf}" if leaf else f"/sys/kernel/irq/{n}"


def pci_device(address: str, leaf: str = "") -> str:
    """A PCI function's directory, or a file in it (``driver``, ``driver_override``, ...)."""
    return f"{PCI_DEVICES}/{address}/{leaf}" if leaf else f"{PCI_DEVICES}/{address}"


# A physical function's SR-IOV files (leaves of its directory), and a VF's link to its PF.
SRIOV_TOTALVFS = "sriov_totalvfs"
SRIOV_NUMVFS = "sriov_numvfs"
SRIOV_DRIVERS_AUTOPROBE = "sriov_drivers_autoprobe"
SRIOV_OFFSET = "sriov_offset"
SRIOV_STRIDE = "sriov_stride"
SRIOV_VF_DEVICE = "sriov_vf_device"
PHYSFN = "physfn"


def virtfn(index: int) -> str:
    """The leaf of a physical function's link to its VF ``index`` (``virtfn0``)."""
    return f"virtfn{index}"


def pci_virtfn(pf: str, index: int) -> str:
    """The link from a physical function to its VF ``index`` (``virtfnN``)."""
    return pci_device(pf, virtfn(index))


def pci_driver(driver: str, leaf: str = "") -> str:
    """A PCI driver's directory, or a file in it (``bind``, ``unbind``, ``new_id``)."""
    return f"{PCI_DRIVERS}/{driver}/{leaf}" if leaf else f"{PCI_DRIVERS}/{driver}"


def iommu_group(group: int | str, leaf: str = "") -> str:
    """An IOMMU group's directory, or a file in it (``devices``, ``type``)."""
    return f"{IOMMU_GROUPS}/{group}/{leaf}" if leaf else f"{IOMMU_GROUPS}/{group}"


def node(n: int, leaf: str = "") -> str:
    """A NUMA node's directory, or a file in it (``cpulist``, ``meminfo``)."""
    return f"{NODE}/node{n}/{leaf}" if leaf else f"{NODE}/node{n}"


def hugepage_pool(size_bytes: int, node_id: int | None = None) -> str:
    """A hugepage pool's directory: the system-wide one, or one node's."""
    base = HUGEPAGES if node_id is None else node(node_id, "hugepages")
    return f"{base}/hugepages-{size_bytes // 1024}kB"


def cpu(n: int, leaf: str = "") -> str:
    """A CPU's directory, or a file under it (``online``, ``topology/core_id``)."""
    return f"{CPU}/cpu{n}/{leaf}" if leaf else f"{CPU}/cpu{n}"


def pmu_cpus(kind: str) -> str:
    """The CPUs of a hybrid part's PMU (``core``: performance, ``atom``: efficiency)."""
    return f"/sys/devices/cpu_{kind}/cpus"


def net(name: str, leaf: str = "") -> str:
    """A network interface's entry in /sys/class/net, or a file in it."""
    return f"{CLASS_NET}/{name}/{leaf}" if leaf else f"{CLASS_NET}/{name}"


def virtio_device(name: str, leaf: str = "") -> str:
    """A virtio device (``virtio0``): ``mount_tag`` for 9p, ``device`` for its type."""
    return f"{VIRTIO_DEVICES}/{name}/{leaf}" if leaf else f"{VIRTIO_DEVICES}/{name}"


def virtiofs(entry: str, leaf: str = "") -> str:
    return f"{FS_VIRTIOFS}/{entry}/{leaf}" if leaf else f"{FS_VIRTIOFS}/{entry}"


def iscsi_connection(name: str, leaf: str = "") -> str:
    """An iSCSI connection (``connection1:0``): ``address`` is its target's IP address."""
    return f"{CLASS_ISCSI_CONNECTION}/{name}/{leaf}" if leaf else f"{CLASS_ISCSI_CONNECTION}/{name}"


def block(name: str, leaf: str = "") -> str:
    """A block device's entry in /sys/class/block, or a file in it (``dev``, ``dm/name``)."""
    return f"{CLASS_BLOCK}/{name}/{leaf}" if leaf else f"{CLASS_BLOCK}/{name}"


def block_by_number(majmin: str) -> str:
    """A block device by its ``major:minor`` (/sys/dev/block/8:1)."""
    return f"{DEV_BLOCK}/{majmin}"


# -- /proc and /dev ---------------------------------------------------------------

PROC = "/proc"
CPUINFO = "/proc/cpuinfo"
MEMINFO = "/proc/meminfo"
INTERRUPTS = "/proc/interrupts"
CMDLINE = "/proc/cmdline"
UPTIME = "/proc/uptime"
SWAPS = "/proc/swaps"
MOUNTS = "/proc/mounts"
SELF_MOUNTS = "/proc/self/mounts"
SELF_MOUNTINFO = "/proc/self/mountinfo"
SELF_CGROUP = "/proc/self/cgroup"
SELF_CPUSET = "/proc/self/cpuset"  # older kernels, and hwloc's trees
SELF_STATUS = "/proc/self/status"
OSRELEASE = "/proc/sys/kernel/osrelease"
HOSTNAME = "/proc/sys/kernel/hostname"
COMPACT_MEMORY = "/proc/sys/vm/compact_memory"
NET_ROUTE = "/proc/net/route"
NET_IPV6_ROUTE = "/proc/net/ipv6_route"
NET_IF_INET6 = "/proc/net/if_inet6"
PROC_IRQ = "/proc/irq"
IRQ_DEFAULT_AFFINITY = "/proc/irq/default_smp_affinity"
DEV = "/dev"
DEV_KVM = "/dev/kvm"
DEV_VFIO_CONTAINER = "/dev/vfio/vfio"
# The account databases: a partition's uid and gid must be in neither (rule 10).
ETC_PASSWD = "/etc/passwd"
ETC_GROUP = "/etc/group"
SYSTEMD_RUNTIME = "/run/systemd/system"  # exists when systemd is the init system


def proc(pid: int | str, leaf: str = "") -> str:
    """A process's directory in /proc, or a file in it (``stat``, ``cmdline``, ``numa_maps``)."""
    return f"{PROC}/{pid}/{leaf}" if leaf else f"{PROC}/{pid}"


def task(pid: int | str, tid: int | str | None = None, leaf: str = "") -> str:
    """A process's task directory, one thread's directory in it, or a file of that thread."""
    base = f"{PROC}/{pid}/task"
    if tid is None:
        return base
    return f"{base}/{tid}/{leaf}" if leaf else f"{base}/{tid}"


def proc_irq(n: int | str, leaf: str = "") -> str:
    """An interrupt's directory in /proc/irq, or a file in it (``smp_affinity_list``)."""
    return f"{PROC_IRQ}/{n}/{leaf}" if leaf else f"{PROC_IRQ}/{n}"


def dev_vfio(group: int | str) -> str:
    """An IOMMU group's VFIO device node."""
    return f"/dev/vfio/{group}"
