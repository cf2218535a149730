"""SR-IOV: a physical function's capability (``sriov_*``), its virtual functions (``virtfnN``)
and each VF's link back (``physfn``).

The kernel links a PF and its VFs both ways, and a VF is never itself a PF nor the VF of
a VF.  A tree that says otherwise (a ``physfn`` naming a function that is not there, or
one that is a VF too, a ``virtfnN`` whose function does not name the PF back) is damaged:
the scan stops with :class:`HostReadError` naming the link, as it does for other links
the kernel cannot have written, because a plan made from it could take a VF from the
wrong PF or change the VF count of a PF whose VFs are in use.  Numbers that are not
numbers, or more VFs than the PF can have, degrade to "no SR-IOV here" with a note and
``PciFunction.sriov_problem`` saying why, which ``plan`` repeats if the site names the PF.

The kernel makes the two links together (``pci_iov_sysfs_link``: ``virtfnN`` in the PF,
then ``physfn`` in the VF; both or neither), so where every PF's links name all its VFs
only the functions they name are asked for ``physfn`` (:func:`read_physfns`): a host of
thousands of functions and a few PFs is spared a failing readlink per function.  A
``physfn`` no ``virtfnN`` leads to is a link the kernel never wrote alone; it is not read
(docs/decisions.md).
"""

from __future__ import annotations

import os
from dataclasses import replace

from partitioner.errors import HostReadError
from partitioner.inventory.model import PciFunction, SriovCaps
from partitioner.inventory.reader import Reader
from partitioner.kernel import sysfs
from partitioner.kernel.root import parse_int
from partitioner.pci import PciAddress, PciAddressSyntaxError

# sriov_totalvfs is a 16-bit field of the capability; so are offset and stride.
MAX_VFS = 0xFFFF


def read_sriov(r: Reader, real: str) -> tuple[SriovCaps | None, str | None]:
    """The SR-IOV capability of the function at ``real`` (its /sys/devices path): (caps, None);
    (None, None) for a function without one; (None, why) for one whose files make no sense."""
    total_path = f"{real}/{sysfs.SRIOV_TOTALVFS}"
    # Only a PF has the file, and asking whether it is there costs less than a failed
    # open: most functions of a large host are no PF.
    if not r.root.exists(total_path):
        return None, None
    total = _count(r, total_path)
    if total is None:
        return None, None
    if isinstance(total, str):
        return None, total
    num = _count(r, f"{real}/{sysfs.SRIOV_NUMVFS}")
    if not isinstance(num, int):
        if num is None:
            num = f"{real}/{sysfs.SRIOV_NUMVFS} is missing"
            r.note(f"{num}: taken as without SR-IOV")
        return None, num
    if num > total:
        why = (
            f"{real}/{sysfs.SRIOV_NUMVFS} says {num} VFs, more than its "
            f"{sysfs.SRIOV_TOTALVFS} of {total}"
        )
        r.note(f"{why}: taken as without SR-IOV")
        return None, why
    autoprobe = r.read_int(f"{real}/{sysfs.SRIOV_DRIVERS_AUTOPROBE}")
    if autoprobe not in (0, 1, None):
        r.note(f"{real}/{sysfs.SRIOV_DRIVERS_AUTOPROBE}: {autoprobe} is not 0 or 1; taken as 1")
    offset = _routing(r, f"{real}/{sysfs.SRIOV_OFFSET}")
    stride = _routing(r, f"{real}/{sysfs.SRIOV_STRIDE}")
    vfs: list[PciAddress] = []
    for i in range(num):
        link = f"{real}/{sysfs.virtfn(i)}"
        target = r.root.readlink(link)
        if target is None:
            r.note(f"{real} has {num} VFs ({sysfs.SRIOV_NUMVFS}) but no {sysfs.virtfn(i)} link")
            break
        vfs.append(_linked(r, link, target))
    return (
        SriovCaps(
            total_vfs=total,
            num_vfs=num,
            drivers_autoprobe=autoprobe != 0,
            vf_offset=offset,
            vf_stride=stride,
            vf_device=r.read_hex(f"{real}/{sysfs.SRIOV_VF_DEVICE}", 4),
            vfs=tuple(vfs),
        ),
        None,
    )


def names_its_vfs(caps: SriovCaps | None, problem: str | None) -> bool:
    """Whether a function's ``virtfnN`` links, as :func:`read_sriov` read them, name all the
    VFs it has: true of a function without SR-IOV files and of a sound PF; false of a PF
    whose numbers make no sense (its links are not read) or with a link missing."""
    return problem is None and (caps is None or len(caps.vfs) == caps.num_vfs)


def read_physfns(
    r: Reader,
    pci: dict[PciAddress, PciFunction],
    dirs: dict[PciAddress, str],
    named: list[PciAddress] | None,
) -> None:
    """Set ``physfn`` in ``pci`` from the links of the functions PFs ``named`` as VFs, or of
    every function (None) where a PF's links do not name all its VFs, as :func:`relate` then
    checks them; ``dirs`` holds each function's directory."""
    for addr in pci if named is None else named:
        fn = pci.get(addr)
        if fn is None or fn.physfn is not None:
            continue  # a virtfnN leading nowhere, or a VF two PFs name: relate says which
        real = dirs[addr]
        link = f"{real}/{sysfs.PHYSFN}"
        target = r.root.readlink(link)
        if target is not None:
            pci[addr] = replace(fn, physfn=_linked(r, link, target))


def relate(pci: dict[PciAddress, PciFunction], r: Reader) -> None:
    """Refuse a tree whose PFs and VFs do not name each other as the kernel links them."""
    for addr, fn in pci.items():
        if fn.physfn is not None:
            where = r.root.path(sysfs.pci_device(str(addr), sysfs.PHYSFN))
            pf = pci.get(fn.physfn)
            if pf is None:
                raise _damaged(
                    where,
                    f"names {fn.physfn}, which is not a PCI function of this host: a virtual "
                    "function without its physical function",
                )
            if fn.physfn == addr:
                raise _damaged(where, f"makes {addr} its own physical function: a physfn loop")
            if pf.physfn is not None:
                raise _damaged(
                    where,
                    f"makes {addr} a virtual function of {fn.physfn}, itself a virtual function "
                    f"of {pf.physfn}: a physfn loop",
                )
            if fn.sriov is not None:
                raise _damaged(
                    where,
                    f"makes {addr}, a physical function with SR-IOV files of its own, a "
                    f"virtual function of {fn.physfn}",
                )
    for addr, fn in pci.items():  # the links back, once every physfn is known sound
        if fn.sriov is not None:
            for i, vf in enumerate(fn.sriov.vfs):
                other = pci.get(vf)
                if other is None or other.physfn != addr:
                    where = r.root.path(sysfs.pci_device(str(addr), sysfs.virtfn(i)))
                    said = (
                        "is not a PCI function of this host"
                        if other is None
                        else f"names {other.physfn} as its physical function"
                        if other.physfn is not None
                        else "has no physfn link back"
                    )
                    raise _damaged(where, f"leads to {vf}, which {said}")


def _damaged(where: os.PathLike[str] | str, what: str) -> HostReadError:
    return HostReadError(
        f"{where} {what}, which the kernel never shows: the tree is damaged; take a new one "
        "with `partition snapshot DIR`",
        path=str(where),
    )


def _linked(r: Reader, link: str, target: str) -> PciAddress:
    name = os.path.basename(target)
    try:
        return PciAddress.parse(name)
    except PciAddressSyntaxError:
        raise _damaged(
            r.root.path(link), f"is a link to {target!r}, not to a PCI function"
        ) from None


def _count(r: Reader, path: str) -> int | str | None:
    """A VF count file: its number, None when it is missing, or why it is no count."""
    text = r.read(path)
    if text is None:
        return None
    value = parse_int(text)
    if value is None or not 0 <= value <= MAX_VFS:
        why = f"{path}: {text[:40]!r} is not a number of VFs (0 to {MAX_VFS})"
        r.note(f"{why}: taken as without SR-IOV")
        return why
    return value


def _routing(r: Reader, path: str) -> int:
    """An offset or stride in routing IDs; 0 (not told) when missing or not one."""
    value = r.read_int(path)
    if value is None or not 0 <= value <= MAX_VFS:
        if value is not None:
            r.note(f"{path}: {value} is not a routing ID offset (0 to {MAX_VFS}); ignored")
        return 0
    return value
