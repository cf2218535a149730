"""SeaBIOS places large 64-bit BARs where ``partitioner/planning/mmio.py`` says it does.

The refusal of ``firmware: bios`` layouts rests on a model of SeaBIOS: the BARs
go right above RAM, each root port's window aligned to its largest BAR and
rounded up to it, whatever the CPU's address width.  Here real SeaBIOS (the
one QEMU ships) lays out real emulated devices with large prefetchable BARs
(``pci-testdev,membar=``) behind PCIe root ports, under TCG with
``phys-bits=36``, and prints where it put them on its debug console; the end of
its 64-bit region must be the model's, even where that is beyond what the CPU
can address.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from partitioner.errors import GuestError
from partitioner.guest.caps import probe_qemu
from partitioner.planning.mmio import layout
from partitioner.run import spawn
from partitioner.units import GiB, MiB

pytestmark = pytest.mark.qemu


def _size(n: int) -> str:
    return f"{n // GiB}G" if n % GiB == 0 else f"{n // MiB}M"


@pytest.mark.parametrize(
    ("memory", "ports"),
    [
        (1 * GiB, [(64 * GiB,)]),
        (1 * GiB, [(256 * GiB, 32 * MiB), (256 * GiB, 32 * MiB)]),
        (8 * GiB, [(128 * GiB, 32 * MiB), (16 * GiB,)]),
    ],
)
def test_seabios_puts_the_bars_where_the_model_says(
    memory: int, ports: list[tuple[int, ...]], tmp_path: Path
) -> None:
    try:
        caps = probe_qemu()
    except GuestError as e:
        pytest.skip(str(e))
    log = tmp_path / "seabios.log"
    argv = [caps.binary, "-machine", "q35", "-accel", "tcg", "-cpu", "max,phys-bits=36"]
    argv += ["-m", _size(memory), "-display", "none", "-nodefaults"]
    for k, bars in enumerate(ports):
        argv += ["-device", f"pcie-root-port,id=rp{k},chassis={k + 1}"]
        for fn, size in enumerate(bars):
            multi = ",multifunction=on" if fn == 0 and len(bars) > 1 else ""
            argv += ["-device", f"pci-testdev,bus=rp{k},addr=0.{fn}{multi},membar={_size(size)}"]
    argv += [
        "-chardev",
        f"file,id=dbg,path={log}",
        "-device",
        "isa-debugcon,iobase=0x402,chardev=dbg",
    ]
    # SeaBIOS lays PCI out first thing, then looks for a VGA device: stop QEMU there.
    proc = spawn(argv)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and "VGA" in log.read_text(errors="replace"):
                break
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    text = log.read_text(errors="replace")
    placed = [
        (int(a, 16), int(s, 16))
        for a, s in re.findall(r"bar \d, addr ([0-9a-f]+), size ([0-9a-f]+) \[prefmem\]", text)
    ]
    assert len(placed) == sum(len(b) for b in ports), text[-2000:]
    end = max(a + s for a, s in placed)
    base, model_end = layout(memory, ports).bios_span()
    m = re.search(r"PCI: 64: [0-9a-f]+ - ([0-9a-f]+)", text)
    assert m is not None, text[-2000:]
    assert int(m.group(1), 16) == model_end
    assert base <= min(a for a, _ in placed) and end <= model_end
    assert model_end > 1 << 36, "SeaBIOS placed them beyond what this CPU can address"
