"""A virtual function's link settings, set and read through its physical function with iproute2.

The PF's driver holds each VF's MAC address, VLAN, spoof checking, trust, link
state and rates; ``ip link set dev PF vf N ...`` sets them over netlink and
``ip -j -d link show dev PF`` reads them back (its ``vfinfo_list``).  iproute2 is
run through :mod:`partitioner.run`, the one place that starts processes.

Each setting is its own ``ip`` command: the kernel applies a message's VF
attributes one by one and stops at the first the driver refuses (``trust`` on
an igb answers EOPNOTSUPP after the MAC and VLAN were set), so one command per
setting both says which setting the driver refused and leaves no doubt about
what was set.  Only settings that differ from what the VF has are sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from partitioner.errors import CommandFailed, DeviceError
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.run import run

IP = "ip"
CLEAR_MAC = "00:00:00:00:00:00"
LINK_STATES = ("auto", "enable", "disable")
IP_TIMEOUT = 60.0


class VfLinkError(DeviceError):
    """A VF's settings could not be read or set through its PF (``ip`` failed or said no)."""


@dataclass(frozen=True)
class VfLink:
    """One VF's settings as its PF shows them; a new VF has these defaults.

    ``spoofchk``, ``trust`` and ``link_state`` are None where the driver does not report them.
    """

    mac: str = CLEAR_MAC
    vlan: int = 0
    qos: int = 0
    spoofchk: bool | None = True
    trust: bool | None = False
    link_state: str | None = "auto"
    min_tx_rate: int = 0
    max_tx_rate: int = 0

    def with_settings(self, settings: Any) -> VfLink:
        """These settings with those a manifest's ``vf:`` names put over them (``mac``, ``vlan``,
        ``qos``, ``spoofchk``, ``trust``, ``link_state``, ``min_tx_rate``, ``max_tx_rate``;
        an attribute that is None or absent leaves the VF's value)."""
        changes: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(settings, f.name, None)
            if v is not None:
                changes[f.name] = v.lower() if f.name == "mac" else v
        if "vlan" in changes and "qos" not in changes:
            changes["qos"] = 0
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> VfLink:
        link = VfLink(
            mac=_mac(d.get("mac", CLEAR_MAC)),
            vlan=_int(d.get("vlan", 0), "vlan", 4095),
            qos=_int(d.get("qos", 0), "qos", 7),
            spoofchk=_opt_bool(d.get("spoofchk"), "spoofchk"),
            trust=_opt_bool(d.get("trust"), "trust"),
            link_state=_opt_state(d.get("link_state")),
            min_tx_rate=_int(d.get("min_tx_rate", 0), "min_tx_rate", 1 << 32),
            max_tx_rate=_int(d.get("max_tx_rate", 0), "max_tx_rate", 1 << 32),
        )
        return link

    def describe(self) -> str:
        """``mac 52:54:00:aa:bb:01, vlan 100`` (what differs from a new VF's defaults)."""
        said = []
        default = VfLink()
        for f in fields(self):
            v = getattr(self, f.name)
            if v != getattr(default, f.name) and v is not None:
                said.append(f"{f.name} {_word(v)}")
        return ", ".join(said) or "defaults"


def _word(v: object) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def _mac(v: object) -> str:
    s = str(v).lower()
    parts = s.split(":")
    if len(parts) != 6 or not all(
        len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts
    ):
        raise ValueError(f"{v!r} is not a MAC address")
    return s


def _int(v: object, what: str, most: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= most:
        raise ValueError(f"{what} {v!r} is not an integer from 0 to {most}")
    return v


def _opt_bool(v: object, what: str) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    raise ValueError(f"{what} {v!r} is neither true, false nor null")


def _opt_state(v: object) -> str | None:
    if v is None:
        return None
    if v not in LINK_STATES:
        raise ValueError(f"link_state {v!r} is not one of {', '.join(LINK_STATES)}")
    return str(v)


# -- reading -------------------------------------------------------------------


def pf_netdev(root: HostRoot, pf: str) -> str:
    """The network interface of ``pf``, through which its VFs' settings are set."""
    names = root.listdir(sysfs.pci_device(pf, "net"))
    if len(names) != 1:
        drv = root.readlink_name(sysfs.pci_device(pf, "driver"))
        why = "none" if not names else f"{len(names)}: {', '.join(sorted(names))}"
        raise VfLinkError(
            f"{pf} must have one network interface to set its VFs' MAC, VLAN and flags "
            f"through (it has {why}; its driver: {drv or 'none bound'}); load the PF's "
            "network driver, or give the VF no settings",
            address=pf,
        )
    return names[0]


def links_of(root: HostRoot, pf: str) -> tuple[str, dict[int, VfLink]] | None:
    """The PF's interface and its VFs' settings as iproute2 reads them now; None for a tree
    (``--host-root``: iproute2 would read this machine's interfaces, not the tree's)."""
    if not root.live:
        return None
    netdev = pf_netdev(root, pf)
    return netdev, read_vf_links(netdev)


def parse_vfinfo(doc: Any, netdev: str) -> dict[int, VfLink]:
    """VF index -> settings, from ``ip -j -d link show dev NETDEV``'s output (parsed JSON).

    Both layouts iproute2 has used are read: ``vlan_list`` (5.x and later) or ``vlan``/``qos``
    on the VF itself, ``rate`` or ``tx_rate``/``max_tx_rate``/``min_tx_rate``.
    """
    if not isinstance(doc, list) or len(doc) != 1 or not isinstance(doc[0], dict):
        raise VfLinkError(
            f"ip -j -d link show dev {netdev}: not the one interface it was asked for"
        )
    out: dict[int, VfLink] = {}
    for vf in doc[0].get("vfinfo_list", []) or []:
        if not isinstance(vf, dict) or not isinstance(vf.get("vf"), int):
            raise VfLinkError(f"ip -j -d link show dev {netdev}: a VF entry without its index")
        vlan = qos = 0
        vlans = vf.get("vlan_list")
        if isinstance(vlans, list) and vlans and isinstance(vlans[0], dict):
            vlan, qos = int(vlans[0].get("vlan", 0) or 0), int(vlans[0].get("qos", 0) or 0)
        elif "vlan" in vf:
            vlan, qos = int(vf.get("vlan") or 0), int(vf.get("qos") or 0)
        rate_v = vf.get("rate")
        rate: dict[str, Any] = rate_v if isinstance(rate_v, dict) else {}
        max_tx = rate.get("max_tx", vf.get("max_tx_rate", vf.get("tx_rate", 0)))
        min_tx = rate.get("min_tx", vf.get("min_tx_rate", 0))
        state = vf.get("link_state")
        out[vf["vf"]] = VfLink(
            mac=str(vf.get("address", vf.get("mac", CLEAR_MAC))).lower(),
            vlan=vlan,
            qos=qos,
            spoofchk=vf["spoofchk"] if isinstance(vf.get("spoofchk"), bool) else None,
            trust=vf["trust"] if isinstance(vf.get("trust"), bool) else None,
            link_state=state if state in LINK_STATES else None,
            min_tx_rate=int(min_tx or 0),
            max_tx_rate=int(max_tx or 0),
        )
    return out


def read_vf_links(netdev: str) -> dict[int, VfLink]:
    """Every VF of the PF whose interface is ``netdev``, with its settings now."""
    argv = [IP, "-j", "-d", "link", "show", "dev", netdev]
    try:
        cp = run(argv, timeout=IP_TIMEOUT)
    except CommandFailed as e:
        raise VfLinkError(
            f"cannot read the VFs of {netdev}: {e} (is iproute2 installed? apt-get install iproute2)"
        ) from e
    try:
        doc = json.loads(cp.stdout)
    except ValueError as e:
        raise VfLinkError(f"{' '.join(argv)}: its output is not JSON ({e})") from e
    return parse_vfinfo(doc, netdev)


# -- setting -------------------------------------------------------------------


def set_args(want: VfLink, now: VfLink) -> list[list[str]]:
    """The ``ip link set dev PF vf N`` arguments that take a VF from ``now`` to ``want``,
    one list per command, only for what differs (a None in ``want`` is left alone)."""
    out: list[list[str]] = []
    if want.mac != now.mac:
        out.append(["mac", want.mac])
    if (want.vlan, want.qos) != (now.vlan, now.qos):
        out.append(["vlan", str(want.vlan), *(["qos", str(want.qos)] if want.vlan else [])])
    if want.spoofchk is not None and want.spoofchk != now.spoofchk:
        out.append(["spoofchk", "on" if want.spoofchk else "off"])
    if want.trust is not None and want.trust != now.trust:
        out.append(["trust", "on" if want.trust else "off"])
    if want.link_state is not None and want.link_state != now.link_state:
        out.append(["state", want.link_state])
    if (want.min_tx_rate, want.max_tx_rate) != (now.min_tx_rate, now.max_tx_rate):
        out.append(["min_tx_rate", str(want.min_tx_rate), "max_tx_rate", str(want.max_tx_rate)])
    return out


def set_vf_link(netdev: str, pf: str, index: int, want: VfLink) -> VfLink:
    """Make VF ``index`` of ``netdev`` (the PF ``pf``'s interface) have ``want``; what it has after.

    Raises VfLinkError naming the setting the PF's driver refused (what was set before it
    stays set: the caller's record says what to put back).
    """
    links = read_vf_links(netdev)
    if index not in links:
        raise VfLinkError(f"{pf} ({netdev}) has no VF {index} (it lists {len(links)})", address=pf)
    for args in set_args(want, links[index]):
        argv = [IP, "link", "set", "dev", netdev, "vf", str(index), *args]
        try:
            run(argv, timeout=IP_TIMEOUT)
        except CommandFailed as e:
            said = e.output.strip().splitlines()[-1] if e.output.strip() else f"exit {e.returncode}"
            raise VfLinkError(
                f"setting {args[0]} of VF {index} of {pf} ({netdev}) failed: {said} "
                f"(does its driver support it?)",
                address=pf,
            ) from e
    got = read_vf_links(netdev).get(index)
    if got is None:
        raise VfLinkError(f"VF {index} of {pf} ({netdev}) is gone", address=pf)
    wrong = set_args(want, got)
    if wrong:
        raise VfLinkError(
            f"VF {index} of {pf} ({netdev}) does not show what was set "
            f"({', '.join(a[0] for a in wrong)}): its driver kept {got.describe()}",
            address=pf,
        )
    return got
