"""Rule 10's numbers: the range of partition users, and the locked-memory limit each
confined QEMU gets (which the plan shows).

A confined QEMU locks its memory (``-overcommit mem-lock=on``) as root, before it
drops to the partition's user; from then on every mapping it makes must fit its
``RLIMIT_MEMLOCK`` together with what is locked already, and so must what VFIO
pins for a device it hands the guest.  The limit is therefore the sum of what is
counted against it (``mm->locked_vm``), not unlimited:

- QEMU's own mappings (heap, libraries, the main loop's and helper threads'
  stacks): ``QEMU_OWN_BYTES``, plus ``VCPU_STACK_BYTES`` per vCPU thread;
- the guest's memory when it is backed by normal pages (hugetlb mappings are
  not counted by mlock);
- the guest's memory once more when a device is assigned: VFIO pins all of it
  for DMA and counts it, hugepages included;
- under TCG, the translation cache (``argv.TCG_TB_SIZE_MIB``).

A dynamic partition (rule 11) counts its ceiling: the vCPU slots, ``max_memory``, and
the guest's memory once more when it has spare slots for devices attached live, since
VFIO pins it after QEMU has dropped to its user, when the limit can no longer be raised.
"""

from __future__ import annotations

from partitioner.planning.model import Placement
from partitioner.units import MiB

# Each confined partition's QEMU runs as uid = gid = USER_BASE + its slot, a range no
# distribution or systemd hands out (docs/decisions.md, "A user of its own per partition");
# the slot is kept in the state record from the first start until destroy.
USER_BASE = 1_879_048_192  # 0x70000000
USER_SLOTS = 65_536


def in_user_range(uid: int) -> bool:
    return USER_BASE <= uid < USER_BASE + USER_SLOTS


QEMU_OWN_BYTES = 512 * MiB  # a TCG guest of 256 MiB locks about 250 MiB besides its RAM and cache
VCPU_STACK_BYTES = 16 * MiB  # glibc's 8 MiB thread stack, locked whole, and its guard and TLS
TCG_TB_BYTES = 256 * MiB  # guest.argv.TCG_TB_SIZE_MIB: the translation cache TCG maps


def memlock_bytes(p: Placement, accel: str) -> int:
    """The RLIMIT_MEMLOCK partition ``p``'s confined QEMU is started with."""
    need = QEMU_OWN_BYTES + VCPU_STACK_BYTES * p.max_vcpus
    if p.hugepage_bytes is None:
        need += p.max_memory_bytes
    if p.devices or p.hotplug_slots:
        need += p.max_memory_bytes
    if accel == "tcg":
        need += TCG_TB_BYTES
    return need
