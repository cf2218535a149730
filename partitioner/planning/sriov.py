"""SR-IOV (rules 4, 5, 6 and 8 for virtual functions): each physical function of ``host.sriov``
found on the host, and each device's ``vf:`` given a VF of it.

A PF stays with the host (a ``pci:`` or ``netdev:`` naming it, or one of its VFs, is
refused: VFs are asked for with ``vf:``).  A VF gets an index, deterministically: the one
``index:`` fixes; for a running partition, the VF it holds; else the lowest free one (in
partition name order, running partitions first, then manifest order), free meaning not
asked for by another device and not used by the host (rule 5).  Its address is the VF's
own when it exists, else where the PF's offset and stride put it (``SriovCaps.vf_address``).

A VF exists with the IOMMU group it will have only when the PF has the planned count of
VFs already: a change of count makes every VF anew.  Then each VF's verdict is asked as
for any function (``vfio.preview``).  When apply has to make them, their groups are not
known yet: their ``DeviceAssignment.iommu_group`` is None, the PF's ``PfPlan`` says so, and
apply claims each VF's group once it exists.  A VF is on its PF's NUMA node (rule 6).

The count of a PF whose VFs the host or a running partition uses is never changed: that
would remove the VFs under them (refused, naming the users).  A PF the host itself uses
(rule 5) keeps working, but changing its count resets it on some drivers: said as a
warning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from partitioner.errors import HostResources
from partitioner.inventory.model import Host, PciFunction, SriovCaps
from partitioner.manifest.model import DeviceSpec, Manifest, PartitionSpec, SriovSpec
from partitioner.pci import PciAddress
from partitioner.planning.model import DeviceAssignment, PfPlan, RunningPartition, VfAssignment
from partitioner.planning.work import Work, handful
from partitioner.vfio.preview import claim_preview, used_by_host


@dataclass(frozen=True)
class _Pf:
    """A PF of host.sriov, found."""

    spec: SriovSpec
    fn: PciFunction
    caps: SriovCaps

    @property
    def address(self) -> PciAddress:
        return self.fn.address

    @property
    def known(self) -> bool:
        """Its VFs exist with the count the site wants: what they are now, they stay."""
        return self.caps.num_vfs == self.spec.vfs

    def said(self) -> str:
        return (
            f"{self.spec.name}"
            if self.spec.pf is not None
            else f"{self.spec.name} ({self.address})"
        )


def plan_sriov(
    manifest: Manifest, host: Host, running: Mapping[str, RunningPartition], w: Work
) -> tuple[PfPlan, ...]:
    """The PFs of ``manifest.host.sriov`` as planned; each ``vf:`` device's VF goes to
    ``w.vf_devices`` (partition -> its entry's index -> the assignment), for
    :func:`partitioner.planning.devices.resolve_devices` to take.  Problems and notes go to
    ``w``.  The PFs and their VFs are taken out of what ``id:`` may match."""
    if not manifest.host.sriov:
        return ()
    pfs = _resolve(manifest, host, running, w)
    _taken_whole(manifest, host, pfs, w)
    _assign(manifest, host, running, pfs, w)
    managed = {a for pf in pfs.values() for a in (pf.address, *pf.caps.vfs)}
    w.by_id = {
        k: [f for f in fns if f.address not in managed]
        for k, fns in w.by_id.items()
        if any(f.address not in managed for f in fns)
    }
    return tuple(
        sorted(
            (
                PfPlan(
                    address=pf.address,
                    netdev=pf.fn.netdevs[0] if pf.fn.netdevs else pf.spec.netdev,
                    vfs=pf.spec.vfs,
                    iommu_groups_known=pf.known,
                )
                for pf in pfs.values()
            ),
            key=lambda p: p.address,
        )
    )


Say = Callable[[str, str], None]  # (message, the PF's address or "")


def _resolve(
    manifest: Manifest, host: Host, running: Mapping[str, RunningPartition], w: Work
) -> dict[str, _Pf]:
    """host.sriov's PFs found on the host, by the name the manifest gives them."""
    out: dict[str, _Pf] = {}
    seen: dict[PciAddress, str] = {}
    holders = {a: name for name, r in sorted(running.items()) for a in r.devices}
    for i, spec in enumerate(manifest.host.sriov):
        field = f"host.sriov[{i}]"

        def problem(
            message: str, address: str, *, spec: SriovSpec = spec, field: str = field
        ) -> None:
            w.problem(
                None, field, f"{field}: {message}", HostResources(address=address), where=spec.where
            )

        fn = _find(spec, host, problem)
        if fn is None:
            continue
        if fn.physfn is not None:
            problem(
                f"{spec.name} is a virtual function (of {fn.physfn}), not a physical function: "
                f"name its PF {fn.physfn}",
                str(fn.address),
            )
            continue
        caps = fn.sriov
        if caps is None:
            why = fn.sriov_problem or (
                "it has no sriov_totalvfs: the device has no SR-IOV capability, or its "
                "firmware keeps it off (look for SR-IOV in the BIOS and the card's settings)"
            )
            problem(f"{spec.name} ({fn.id}) cannot make virtual functions: {why}", str(fn.address))
            continue
        if spec.vfs > caps.total_vfs:
            problem(
                f"vfs is {spec.vfs} but {spec.name} can have {caps.total_vfs} VF"
                f"{'s' if caps.total_vfs != 1 else ''} (sriov_totalvfs): ask for at most "
                f"{caps.total_vfs}",
                str(fn.address),
            )
            continue
        if fn.address in seen:
            problem(
                f"{spec.name} is the PF {fn.address}, which host.sriov already lists as "
                f"{seen[fn.address]}: one entry per PF",
                str(fn.address),
            )
            continue
        seen[fn.address] = spec.name
        pf = _Pf(spec, fn, caps)
        if not pf.known and not _count_change_ok(pf, host, holders, w, problem):
            continue
        out[spec.name] = pf
    return out


def _find(spec: SriovSpec, host: Host, problem: Say) -> PciFunction | None:
    if spec.pf is not None:
        fn = host.pci.get(PciAddress.parse(spec.pf))
        if fn is None:
            problem(f"the PF {spec.pf} is not on this host", spec.pf)
        return fn
    iface = host.netdevs.get(str(spec.netdev))
    if iface is None:
        problem(f"network interface {spec.netdev} is not on this host", "")
        return None
    if iface.pci is None or iface.pci not in host.pci:
        problem(
            f"network interface {spec.netdev} is not a PCI function (virtual or on another bus)",
            "",
        )
        return None
    return host.pci[iface.pci]


def _count_change_ok(
    pf: _Pf, host: Host, holders: Mapping[PciAddress, str], w: Work, problem: Say
) -> bool:
    """Whether apply may change the PF's VF count (every VF it has goes, and new ones come):
    not while the host or a running partition uses one of them.  Notes what it means."""
    users: list[str] = []
    for index, vf in enumerate(pf.caps.vfs):
        uses = host.in_use.get(vf, ())
        if uses:
            users.append(f"VF {index} ({vf}) is used by the host: {', '.join(uses)}")
        if vf in holders:
            users.append(f"VF {index} ({vf}) is held by partition {holders[vf]}")
    if users:
        problem(
            f"{pf.said()} has {pf.caps.num_vfs} VFs and vfs asks {pf.spec.vfs}: changing the "
            f"count removes every VF of it, and {handful(users, sep='; ')}; keep vfs: "
            f"{pf.caps.num_vfs}, or free them first (destroy the partitions, take the host's "
            "use off them)",
            str(pf.address),
        )
        return False
    if used_by_host(host, pf.fn):
        said = ", ".join(host.in_use.get(pf.address, ())) or "the boot VGA device"
        w.notes.append(
            f"warning: {pf.said()} of host.sriov is used by the host ({said}): apply changes "
            f"its VF count from {pf.caps.num_vfs} to {pf.spec.vfs}, which resets the PF on "
            "some drivers (its link goes down for a moment); `partition host setup` makes the "
            "VFs at boot instead"
        )
    w.notes.append(
        f"{pf.said()}: apply makes its {pf.spec.vfs} VFs (sriov_numvfs {pf.caps.num_vfs} -> "
        f"{pf.spec.vfs}, host drivers kept off them); a VF's IOMMU group is known once it "
        "exists: the plan shows none (iommu_group null) and apply claims it then"
    )
    return True


def _taken_whole(manifest: Manifest, host: Host, pfs: Mapping[str, _Pf], w: Work) -> None:
    """A `pci:` or `netdev:` naming a PF of host.sriov, or one of its VFs: refused, the PF
    stays with the host and its VFs are asked for with `vf:`."""
    by_address = {pf.address: pf for pf in pfs.values()}
    vf_of = {vf: (pf, i) for pf in pfs.values() for i, vf in enumerate(pf.caps.vfs)}
    for spec in manifest.partitions.values():
        for i, dev in enumerate(spec.devices):
            if dev.kind == "pci":
                address: PciAddress | None = PciAddress.parse(dev.value)
            elif dev.kind == "netdev":
                iface = host.netdevs.get(dev.value)
                address = None if iface is None else iface.pci
            else:
                continue
            if address in by_address:
                pf = by_address[address]
                w.problem(
                    spec,
                    f"devices[{i}]",
                    f"{spec.name}: {dev} is the PF {pf.said()} of host.sriov, which stays with "
                    f"the host: take a virtual function of it with `vf: {pf.spec.name}`",
                    HostResources(address=str(address)),
                )
            elif address in vf_of:
                pf, index = vf_of[address]
                w.problem(
                    spec,
                    f"devices[{i}]",
                    f"{spec.name}: {dev} is VF {index} of {pf.said()} in host.sriov: ask for it "
                    f"with `vf: {pf.spec.name}` and `index: {index}`",
                    HostResources(address=str(address)),
                )


def _assign(
    manifest: Manifest,
    host: Host,
    running: Mapping[str, RunningPartition],
    pfs: Mapping[str, _Pf],
    w: Work,
) -> None:
    """Each `vf:` device's VF: fixed indices, then the VFs running partitions hold, then the
    lowest free, in partition order (running first, then by name) and manifest order."""
    order = sorted(manifest.partitions.values(), key=lambda p: (p.name not in running, p.name))
    wanted: list[tuple[PartitionSpec, int, DeviceSpec, _Pf]] = []
    for spec in order:
        for i, dev in enumerate(spec.devices):
            if dev.kind != "vf":
                continue
            pf = pfs.get(dev.value)
            if pf is None:
                if not dev.required:
                    w.notes.append(
                        f"{spec.name}: optional device left out: {dev} (its PF could not be "
                        "used, see host.sriov)"
                    )
                continue  # a required one fails with its PF's problem, said at host.sriov
            wanted.append((spec, i, dev, pf))
    taken: dict[tuple[str, int], str] = {}  # (PF name, index) -> partition
    chosen: dict[tuple[str, int], int] = {}  # (partition, entry) -> index
    for spec, i, dev, pf in wanted:
        if dev.vf_index is not None:
            taken[(pf.spec.name, dev.vf_index)] = spec.name
            chosen[(spec.name, i)] = dev.vf_index
    for spec, i, _, pf in wanted:
        if (spec.name, i) in chosen or spec.name not in running:
            continue
        for index in _held(pf, running[spec.name]):
            if (pf.spec.name, index) not in taken:
                taken[(pf.spec.name, index)] = spec.name
                chosen[(spec.name, i)] = index
                break
    for spec, i, dev, pf in wanted:
        if (spec.name, i) in chosen:
            continue
        free = next(
            (
                k
                for k in range(pf.spec.vfs)
                if (pf.spec.name, k) not in taken and not _host_uses(pf, k, host)
            ),
            None,
        )
        if free is None:
            held = [
                f"VF {k} is {taken[(pf.spec.name, k)]}'s"
                if (pf.spec.name, k) in taken
                else f"VF {k} is used by the host"
                for k in range(pf.spec.vfs)
            ]
            what = f"no free VF of {pf.said()}, which has {pf.spec.vfs}: {handful(held)}"
            if dev.required:
                w.problem(spec, f"devices[{i}]", f"{spec.name}: {what}")
            else:
                w.notes.append(f"{spec.name}: optional device left out: {what}")
            continue
        taken[(pf.spec.name, free)] = spec.name
        chosen[(spec.name, i)] = free
    for spec, i, dev, pf in wanted:
        if (spec.name, i) not in chosen:
            continue
        a = _assignment(spec, i, dev, pf, chosen[(spec.name, i)], host, w)
        if a is not None:
            w.vf_devices.setdefault(spec.name, {})[i] = a


def _held(pf: _Pf, r: RunningPartition) -> list[int]:
    """The indices of ``pf``'s VFs that the running partition holds."""
    held = set(r.devices)
    out = [k for k, vf in enumerate(pf.caps.vfs) if vf in held]
    if not out:  # VFs the record names that are not made (yet): by where they would be
        out = [k for k in range(pf.spec.vfs) if pf.caps.vf_address(pf.address, k) in held]
    return sorted(out)


def _host_uses(pf: _Pf, index: int, host: Host) -> bool:
    """Rule 5: a VF that exists and stays (the count does not change) and the host uses."""
    return pf.known and index < len(pf.caps.vfs) and bool(host.in_use.get(pf.caps.vfs[index]))


def _assignment(
    spec: PartitionSpec, i: int, dev: DeviceSpec, pf: _Pf, index: int, host: Host, w: Work
) -> DeviceAssignment | None:
    field = f"devices[{i}]"
    address = pf.caps.vf_address(pf.address, index)
    if address is None:
        w.problem(
            spec,
            field,
            f"{spec.name}: where VF {index} of {pf.said()} will be cannot be told: the PF "
            f"shows no VF offset and stride (sriov_offset {pf.caps.vf_offset}, sriov_stride "
            f"{pf.caps.vf_stride})",
            HostResources(address=str(pf.address)),
        )
        return None
    vf = VfAssignment(pf=pf.address, index=index, settings=dev.vf_settings)
    reason = f"named as vf: {dev.value} (VF {index} of {pf.address})"
    fn = host.pci.get(address) if pf.known else None
    if fn is None:
        device = pf.caps.vf_device
        return DeviceAssignment(
            address=address,
            iommu_group=None,
            vendor_device=f"{pf.fn.vendor}:{device}" if device else pf.fn.id,
            driver=None,
            added=False,
            reason=reason,
            reset_none_ok=dev.reset_none_ok,
            vf=vf,
        )
    verdict = claim_preview(host, address)
    refusals = list(verdict.refusals)
    refusals += [
        f"IOMMU group {fn.iommu_group} of {address} also holds {m}: the PF's VFs are not "
        "isolated from each other (no ACS), and a group is assigned whole (rule 4)"
        for m in verdict.must_name
    ]
    if refusals or fn.iommu_group is None:
        w.problem(
            spec,
            field,
            f"{spec.name}: VF {index} of {pf.said()}, {address} ({fn.id}), cannot be assigned: "
            + ("; ".join(refusals) or "it is in no IOMMU group"),
            HostResources(address=str(address), iommu_group=fn.iommu_group, node=fn.numa_node),
        )
        return None
    return DeviceAssignment(
        address=address,
        iommu_group=fn.iommu_group,
        vendor_device=fn.id,
        driver=fn.driver,
        added=False,
        reason=reason,
        reset_none_ok=dev.reset_none_ok,
        vf=vf,
    )
