"""The read-only verbs through the real entry point: exit codes and JSON shapes of cli.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import corpus
import pytest
from treebuilder import GiB, MiB, TreeBuilder

from partitioner.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "partitions").glob("*.yaml"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def server(t: TreeBuilder) -> Path:
    t.cpus(count=16, packages=2, threads=2, nodes=2, memory_per_node=16 * GiB)
    for n in range(2):
        t.node(n, memory_bytes=16 * GiB, free_bytes=12 * GiB, hugepages={2 * MiB: (0, 0)})
    t.kvm()
    t.pci("0000:80:01.0", class_code="060400", driver="pcieport", iommu_group=10, numa_node=1)
    t.pci(
        "0000:81:00.0",
        driver="e1000e",
        iommu_group=19,
        numa_node=1,
        parent="0000:80:01.0",
        netdevs=("enp129s0",),
    )
    t.pci(
        "0000:81:00.1",
        driver="e1000e",
        iommu_group=19,
        numa_node=1,
        parent="0000:80:01.0",
        netdevs=("enp129s1",),
    )
    return t.build()


SITE = """\
version: 1
host: {reserve: {cpus: 2, memory: 2GiB}}
partitions:
  fw0:
    cpus: 4
    memory: 4GiB
    devices: [{pci: "81:00.0"}]
"""


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_validate_examples(capsys: pytest.CaptureFixture[str], example: Path) -> None:
    rc, out, _ = run(capsys, "validate", str(example))
    assert rc == 0 and "valid" in out


def test_validate_bad_manifest_exit_2_with_locations(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npartitions:\n  Fw0:\n    cpus: 0\n    memory: 4GB\n")
    rc, out, err = run(capsys, "validate", str(bad))
    assert rc == 2 and out == ""
    assert f"{bad}:3:3:" in err and f"{bad}:5:" in err
    assert "Traceback" not in err
    rc, out, _ = run(capsys, "--json", "validate", str(bad))
    doc = json.loads(out)
    assert rc == 2 and doc["valid"] is False and {p["line"] for p in doc["problems"]} >= {3, 5}


def test_inspect_json_shape_on_a_real_tree(
    capsys: pytest.CaptureFixture[str], hwloc_trees: corpus.Trees
) -> None:
    root = hwloc_trees["40intel64-2g2n4c+pcilocality"]
    rc, out, _ = run(capsys, "--host-root", str(root), "--json", "inspect")
    assert rc == 0
    doc = json.loads(out)
    cpu = doc["cpus"][0]
    assert {"cpu", "core", "package", "node", "online", "siblings"} <= cpu.keys()
    node = doc["numa_nodes"][0]
    assert {"node", "cpus", "memory_bytes", "hugepages"} <= node.keys()
    assert {"2MiB", "1GiB"} & node["hugepages"].keys()
    assert doc["pci"], "this tree has PCI devices"
    fn = doc["pci"][0]
    for key in (
        "address",
        "vendor",
        "device",
        "class",
        "iommu_group",
        "numa_node",
        "driver",
        "netdev",
        "is_bridge",
        "assignable",
        "why_not",
    ):
        assert key in fn
    assert all(len(f["address"]) == 12 for f in doc["pci"])


def test_inspect_table_says_why_not(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = server(TreeBuilder(tmp_path / "h"))
    rc, out, _ = run(capsys, "--host-root", str(root), "inspect")
    assert rc == 0
    line = next(x for x in out.splitlines() if x.startswith("0000:81:00.0"))
    assert line.endswith(" yes+1") and line.count("0000:81:00.0") == 1
    bridge = next(x for x in out.splitlines() if x.startswith("0000:80:01.0"))
    assert bridge.endswith(" no:bridge")
    assert "bridges and ports stay with the host (rule 4)" in out


def test_inspect_table_is_short_and_says_reasons_once_per_group(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    t = TreeBuilder(tmp_path / "h")
    server(t)
    # A group of four functions, one of which the host uses: every member is refused.
    for f in range(4):
        t.pci(f"0000:05:00.{f}", driver="igb", iommu_group=30, netdevs=(f"enp5s0f{f}",))
    t.netdev_up("enp5s0f0", default_route=True)
    root = t.build()
    rc, out, _ = run(capsys, "--host-root", str(root), "inspect")
    assert rc == 0
    rows = [x for x in out.splitlines() if x.startswith("0000:05:00.")]
    assert rows[0].endswith(" no:host")
    assert all(r.endswith(" no:group") for r in rows[1:])
    assert all(len(r) <= 100 for r in rows)
    assert out.count("enp5s0f0 carries the default route") == 1
    assert "IOMMU group 30 (0000:05:00.0, 0000:05:00.1, 0000:05:00.2, 0000:05:00.3):" in out
    # The JSON keeps the full reasons per function (cli.md).
    rc, js, _ = run(capsys, "--host-root", str(root), "--json", "inspect")
    fns = {f["address"]: f for f in json.loads(js)["pci"]}
    assert fns["0000:05:00.1"]["assignable"] is False
    assert "0000:05:00.0" in fns["0000:05:00.1"]["why_not"]


def test_plan_json_shape_and_determinism(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = server(TreeBuilder(tmp_path / "h"))
    site = tmp_path / "site.yaml"
    site.write_text(SITE)
    rc, out, _ = run(capsys, "--host-root", str(root), "--json", "plan", str(site))
    assert rc == 0
    doc = json.loads(out)
    fw0 = doc["partitions"]["fw0"]
    assert fw0["numa_nodes"] == [1] and len(fw0["cpus"]) == 4
    assert fw0["memory_bytes"] == 4 * GiB and fw0["hugepages"] == "2MiB"
    assert fw0["devices"] == ["0000:81:00.0"] and fw0["added_devices"] == ["0000:81:00.1"]
    assert fw0["iommu_groups"] == [19]
    assert doc["host"] == {"cpus": [0, 8], "memory_bytes": 2 * GiB}
    kinds = [a["action"] for a in doc["actions"]]
    assert {"action", "target", "detail"} <= doc["actions"][0].keys()
    assert any("start" in k for k in kinds)
    rc2, out2, _ = run(capsys, "--host-root", str(root), "--json", "plan", str(site))
    assert rc2 == 0 and out2 == out


def test_plan_that_does_not_fit_exits_3(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = server(TreeBuilder(tmp_path / "h"))
    site = tmp_path / "site.yaml"
    site.write_text(SITE.replace("cpus: 4", "cpus: 10"))
    rc, out, err = run(capsys, "--host-root", str(root), "plan", str(site))
    assert rc == 3 and out == ""
    assert "fw0 needs 10 CPUs on node 1" in err and "0000:81:00.0" in err


def test_bad_host_root_is_exit_2_not_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc, _, err = run(capsys, "--host-root", str(tmp_path), "inspect")
    assert rc == 2 and "Traceback" not in err and str(tmp_path) in err


def test_apply_refuses_host_root(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(SITE)
    rc, _, err = run(capsys, "--host-root", str(tmp_path), "apply", str(site))
    assert rc == 2 and "--host-root" in err


def test_console_script_usage_errors_exit_2() -> None:
    cp = subprocess.run(
        [sys.executable, "-m", "partitioner.cli.main", "no-such-verb"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cp.returncode == 2 and "unknown verb 'no-such-verb'" in cp.stderr
    cp = subprocess.run(
        [sys.executable, "-m", "partitioner.cli.main", "validate", "/nonexistent/site.yaml"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (
        cp.returncode == 2
        and "Traceback" not in cp.stderr
        and "/nonexistent/site.yaml" in cp.stderr
    )
