"""More vCPUs than the host's KVM lets one VM have: refused by plan and apply (exit 3).

The limit is KVM's own answer (``KVM_CHECK_EXTENSION(KVM_CAP_MAX_VCPUS)``, asked by
``guest/kvm.py``); the planning function is checked with given limits, and the
commands against this machine's real /dev/kvm.  Under ``--host-root`` the tree's
KVM is not this machine's: a note, not a refusal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from treebuilder import TreeBuilder

from partitioner.cli.main import main
from partitioner.errors import PlanError
from partitioner.guest.kvm import probe_kvm
from partitioner.inventory import scan
from partitioner.kernel.root import HostRoot
from partitioner.manifest.loader import loads
from partitioner.planning.files import checked_plan
from partitioner.planning.planner import kvm_vcpu_problems

SITE = """\
version: 1
host:
  reserve: {{cpus: 1, memory: 1GiB}}
  accel: {accel}
  isolation: pinned
  smt: share
partitions:
  small: {{cpus: 2, memory: 128MiB, hugepages: none}}
  big:
    cpus: {cpus}
    memory: 128MiB
    hugepages: none
"""


def site(cpus: int, accel: str = "kvm") -> str:
    return SITE.format(cpus=cpus, accel=accel)


def test_planning_refuses_more_vcpus_than_the_limit_on_both_sides() -> None:
    at = loads(site(288), "site.yaml")
    assert kvm_vcpu_problems(at, 288) == []  # exactly KVM's limit fits
    [found] = kvm_vcpu_problems(at, 287)
    problem = str(found)
    # Located at the partition's `cpus:` (line 10 of the site), named, both numbers, what to do.
    assert problem.startswith("site.yaml:10:")
    assert (found.partition, found.field) == ("big", "cpus")
    assert "big asks for 288 CPUs" in problem
    assert "at most 287 vCPUs (KVM_CAP_MAX_VCPUS)" in problem
    assert "give big at most 287 CPUs" in problem
    # Every partition over the limit is named; one under it is not.
    two = kvm_vcpu_problems(at, 1)
    assert [p.partition for p in two] == ["big", "small"]
    # Under TCG KVM starts nothing: its limit does not apply.
    assert kvm_vcpu_problems(loads(site(288, accel="tcg"), "site.yaml"), 1) == []


def live_limit() -> int:
    if not Path("/dev/kvm").exists():
        pytest.skip("no /dev/kvm here")
    kvm = probe_kvm()
    assert kvm.available, kvm.error
    return kvm.max_vcpus


def test_plan_and_apply_refuse_more_vcpus_than_this_machines_kvm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = live_limit()
    assert limit > 0  # KVM_CAP_MAX_VCPUS (or KVM_CAP_NR_VCPUS) as this kernel answers it
    if limit + 1 > 8192:
        pytest.skip(f"KVM allows {limit} vCPUs, more than a manifest may ask for")
    path = tmp_path / "site.yaml"
    path.write_text(site(limit + 1))
    dirs = {name: tmp_path / name for name in ("state", "run", "log")}
    for name, d in dirs.items():
        monkeypatch.setenv(f"PARTITION_{name.upper()}_DIR", str(d))
    assert main(["plan", str(path)]) == 3
    err = capsys.readouterr().err
    assert f"{path}:10:" in err
    assert f"big asks for {limit + 1} CPUs" in err
    assert f"at most {limit} vCPUs (KVM_CAP_MAX_VCPUS)" in err
    # apply refuses it the same way, before it changes anything: no record, no guest.
    assert main(["apply", str(path)]) == 3
    assert f"at most {limit} vCPUs" in capsys.readouterr().err
    # ... and so does the boot-time start.
    assert main(["host", "boot", "--no-supervise", str(path)]) == 3
    assert f"at most {limit} vCPUs" in capsys.readouterr().err
    assert not (dirs["state"] / "state.json").exists()
    assert not dirs["run"].exists() or not any(dirs["run"].iterdir())


def test_host_root_notes_what_this_machine_would_refuse(
    tree: TreeBuilder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tree with more CPUs than this machine's KVM allows one VM: the same manifest is
    refused for this machine (its KVM answers) and only noted for the tree's."""
    limit = live_limit()
    if limit + 4 > 8192:
        pytest.skip(f"KVM allows {limit} vCPUs, more than a manifest may ask for")
    tree.cpus(count=limit + 4).kvm()
    root = tree.build()
    path = tmp_path / "site.yaml"
    path.write_text(site(limit + 1))
    manifest = loads(path.read_text(), str(path))
    host = scan(HostRoot(root))
    with pytest.raises(PlanError) as e:
        checked_plan(manifest, host, here=True)
    assert any(f"at most {limit} vCPUs" in str(p) for p in e.value.problems)
    elsewhere = checked_plan(manifest, host, here=False)
    assert len(elsewhere.placements["big"].cpuset) == limit + 1
    assert any("not checked against KVM's limit" in n for n in elsewhere.notes)

    common = ["--host-root", str(root), "--state-dir", str(tmp_path / "state")]
    assert main([*common, "--json", "plan", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    [note] = [n for n in doc["notes"] if "KVM's limit" in n]
    assert "--host-root" in note and f"big, {limit + 1}" in note
    assert main([*common, "plan", str(path)]) == 0
    said = capsys.readouterr()
    assert "note: the vCPU counts were not checked against KVM's limit" in said.err
    assert "note:" not in said.out  # notes go to stderr (cli.md)
