"""``partition host check [FILE]``, ``partition host setup FILE``, ``partition host boot FILE``:
the machine itself, and what it carries at boot for a site."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from partitioner.boot.check import (
    CheckItem,
    check_host,
    check_site,
    exit_code,
    probe_kvm_cpu_host,
)
from partitioner.boot.setup import (
    SITE_COPY,
    TARGET_PARTITION,
    FileChange,
    HostFacts,
    SetupPlan,
    boot_settings,
    changes,
    compile_setup,
    detect_target,
    follow_up,
    read_facts,
    reboot_needed,
    undo_changes,
    write,
)
from partitioner.cli.common import MANIFEST_HELP, Context
from partitioner.errors import PartitionError, UsageError
from partitioner.kernel import sysfs
from partitioner.manifest.model import vf_settings_to_json


class SetupIncomplete(PartitionError):
    """The files were written but a command that activates them failed."""

    exit_code = 5

    def __init__(self, message: str, leftover: list[str]) -> None:
        self.leftover = leftover
        super().__init__(message)


def register(sub: Any) -> None:
    p = sub.add_parser("host", help="check this machine, and set it up to boot into a site")
    hs = p.add_subparsers(dest="host_verb", metavar="SUBCOMMAND")
    hs.required = True

    c = hs.add_parser(
        "check",
        help="is this machine ready to run partitions; with FILE, does it carry the site's boot settings",
    )
    c.add_argument("file", metavar="FILE", nargs="?", help=MANIFEST_HELP)
    c.add_argument(
        "--no-probe",
        action="store_true",
        help="do not start QEMU to see whether /dev/kvm runs `-cpu host`",
    )
    c.set_defaults(func=run_check)

    s = hs.add_parser("setup", help="write what the host needs at boot for a site")
    s.add_argument("file", metavar="FILE", help=MANIFEST_HELP)
    s.add_argument(
        "--dry-run", action="store_true", help="print the files and changes; write nothing"
    )
    s.add_argument("--undo", action="store_true", help="remove everything an earlier setup wrote")
    s.add_argument(
        "--root",
        metavar="DIR",
        default="/",
        help="write under DIR instead of / (an image being prepared, a test tree); "
        "boot loader and initramfs tools run only when DIR is /",
    )
    s.add_argument(
        "--partition-bin",
        metavar="PATH",
        help="the `partition` program on the target, as the boot-time service runs it "
        f"(default: this one when DIR is / of this machine, else {TARGET_PARTITION})",
    )
    s.set_defaults(func=run_setup)

    b = hs.add_parser(
        "boot",
        help="start the site's autostart partitions in order (what the boot-time service runs)",
    )
    b.add_argument("file", metavar="FILE", help=MANIFEST_HELP)
    b.add_argument(
        "--no-supervise",
        action="store_true",
        help="start the partitions and return, instead of staying to restart crashed ones",
    )
    b.set_defaults(func=run_boot)

    w = hs.add_parser(
        "supervise",
        help=(
            "watch the applied partitions, restart crashed ones (on_crash) and keep their device"
            " interrupts on their CPUs, in the foreground"
        ),
    )
    w.add_argument(
        "--poll", metavar="S", type=float, default=0.5, help="seconds between looks (default 0.5)"
    )
    # How it was started: `apply` starts it detached or as a systemd unit (partitioner.boot.watcher);
    # such a one leaves when another watches already, or when no partition is left.
    w.add_argument(
        "--as",
        dest="how",
        choices=("foreground", "detached", "systemd"),
        default="foreground",
        help=argparse.SUPPRESS,
    )
    w.set_defaults(func=run_supervise)


# -- check ----------------------------------------------------------------------------------


def _site_settings(ctx: Context, file: str, facts: HostFacts, host: Any = None) -> Any:
    from partitioner.inventory import scan
    from partitioner.manifest.loader import load
    from partitioner.planning.planner import plan
    from partitioner.record.model import running_partitions
    from partitioner.record.reconcile import reconcile
    from partitioner.record.store import StateStore

    manifest = load(file)
    root = ctx.root()
    host = host if host is not None else scan(root)
    running = {}
    if ctx.host_root is None:
        store = StateStore(ctx.state_dir)
        state = reconcile(store.load(), root, busy=store.busy()).state
        running = running_partitions(state)
    result = plan(manifest, host, running)
    return manifest, host, result, boot_settings(manifest, result, host, facts)


def run_check(args: argparse.Namespace, ctx: Context) -> int:
    from partitioner.inventory import scan

    root = ctx.root()
    facts = read_facts(root)
    host = scan(root)
    site = None
    if args.file is not None:
        manifest, _, _, settings = _site_settings(ctx, args.file, facts, host)
        site = manifest.host.accel
    items = check_host(root, host, facts, accel=site)
    if (
        root.live
        and not args.no_probe
        and root.exists(sysfs.DEV_KVM)
        and shutil.which("qemu-system-x86_64")
    ):
        # After /dev/kvm: whether it runs a vCPU the way partitions use it.
        at = next(i for i, it in enumerate(items) if it.id == "kvm") + 1
        items.insert(at, probe_kvm_cpu_host())
    reboot: list[str] = []
    if args.file is not None:
        items.extend(check_site(root, host, facts, settings, args.file))
        reboot = reboot_needed(settings, facts)
    rc = exit_code(items)
    if ctx.json:
        ctx.emit_json(
            {
                "ok": rc == 0,
                "exit": rc,
                "items": [i.to_json() for i in items],
                "reboot_needed": bool(
                    reboot or any(i.reboot and i.status == "fail" for i in items)
                ),
                "missing_kernel_args": reboot,
                "problems": [f"{i.title}: {i.detail}" for i in items if i.status == "fail"],
            }
        )
        return rc
    ctx.say(_render_items(items))
    fails = sum(i.status == "fail" for i in items)
    warns = sum(i.status == "warn" for i in items)
    unknown = sum(i.status == "unknown" for i in items)
    ctx.say()
    ctx.say(
        f"{len(items)} checks: {len(items) - fails - warns - unknown} pass, {warns} warn, {fails} fail"
        + (f", {unknown} unknown (not in the host tree)" if unknown else "")
        + (
            "; a reboot is needed after the fixes marked (reboot)"
            if any(i.reboot and i.status == "fail" for i in items)
            else ""
        )
    )
    return rc


def _render_items(items: list[CheckItem]) -> str:
    width = max(len(i.title) for i in items)
    status_width = max(4, *(len(i.status) for i in items))
    lines = []
    for i in items:
        lines.append(f"{i.status.upper():<{status_width}}  {i.title:<{width}}  {i.detail}")
        if i.fix and i.status not in ("pass", "unknown"):
            lines.append(
                f"{'':<{status_width}}  {'':<{width}}  fix: {i.fix}"
                + (" (reboot)" if i.reboot else "")
            )
    return "\n".join(lines)


# -- setup ----------------------------------------------------------------------------------


def _is_program(root_dir: Path, path: str) -> bool:
    local = root_dir / path.lstrip("/")
    if local.is_symlink() and os.readlink(local).startswith("/"):
        # An absolute link means a path on the target, not on this machine.
        return _is_program(root_dir, os.readlink(local))
    return local.is_file() and os.access(local, os.X_OK)


def partition_command() -> list[str]:
    """How the boot-time service calls this program: the installed console script when there is
    one beside this interpreter or on PATH, else the interpreter and the module."""
    beside = Path(os.path.normpath(os.path.abspath(sys.executable))).parent / "partition"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("partition")
    if found:
        return [found]
    return [sys.executable, "-m", "partitioner.cli.main"]


def target_command(args: argparse.Namespace, ctx: Context, root_dir: Path) -> list[str]:
    """The ``partition`` the target's boot-time service runs.  This program is the right one only
    when the target is this machine; an image or another machine gets a stable path of its own
    (a virtual environment of the machine that compiled the files is not there)."""
    given = args.partition_bin
    if given is not None:
        if not given.startswith("/") or given.endswith("/") or "\n" in given:
            raise UsageError(
                f"--partition-bin {given!r} is not an absolute path of a program: give where "
                "`partition` is on the target, such as /usr/local/bin/partition"
            )
        return [os.path.normpath(given)]
    if root_dir == Path("/") and ctx.host_root is None:
        return partition_command()
    return [TARGET_PARTITION]


def run_setup(args: argparse.Namespace, ctx: Context) -> int:
    root_dir = Path(args.root).resolve()
    live_target = root_dir == Path("/")
    if ctx.host_root is not None and live_target and not args.dry_run:
        raise UsageError(
            f"--host-root {ctx.host_root} describes another machine: write its files under a "
            "directory with --root DIR (its image), or use --dry-run"
        )
    if not root_dir.is_dir() and not args.dry_run:
        raise UsageError(f"--root {args.root} is not a directory")
    target = detect_target(root_dir)
    facts = read_facts(ctx.root())
    setup: SetupPlan | None = None
    if args.undo:
        change_list = undo_changes(target)
    else:
        from partitioner.manifest.loader import read_manifest

        manifest, host, result, _ = _site_settings(ctx, args.file, facts)
        # The same bytes load read (standard input is read once), copied into the machine.
        text = read_manifest(args.file)[0].decode("utf-8")
        program = target_command(args, ctx, root_dir)
        setup = compile_setup(manifest, text, result, host, facts, target, program)
        if not args.dry_run and not _is_program(root_dir, program[0]):
            setup = replace(
                setup,
                notes=(
                    *setup.notes,
                    f"{program[0]} is not a program in {root_dir}: install partition there "
                    "before the next boot (pip install --prefix /usr/local, or a link to it), "
                    "or give where it is with --partition-bin",
                ),
            )
        change_list = changes(setup)
    changed = [c for c in change_list if c.action != "unchanged"]
    commands = follow_up(target, changed, facts)
    run_commands = live_target and not args.dry_run and bool(commands.argv)
    reboot = reboot_needed(setup.settings, facts) if setup is not None else []
    ran: list[str] = []
    if not args.dry_run and changed:
        if live_target and os.geteuid() != 0:
            raise UsageError("writing the boot configuration of this machine needs root")
        write(target, changed)
        if run_commands:
            from partitioner.run import CommandFailed, run

            for argv in commands.argv:
                try:
                    run(list(argv), timeout=900)
                except CommandFailed as e:
                    raise SetupIncomplete(
                        f"the files are written, but {shlex.join(argv)} failed: {e}. "
                        "Run it yourself before rebooting",
                        [c.path for c in changed],
                    ) from e
                ran.append(shlex.join(argv))
    doc: dict[str, Any] = {
        "root": str(root_dir),
        "dry_run": bool(args.dry_run),
        "undo": bool(args.undo),
        "bootloader": target.bootloader,
        "initramfs": target.initramfs,
        "systemd": target.systemd,
        "changed": bool(changed),
        "files": [c.to_json() for c in change_list],
        "commands": [shlex.join(a) for a in commands.argv],
        "commands_run": ran,
        "kernel_args": list(setup.settings.kernel_args) if setup else [],
        "reboot_needed": bool(
            changed
            and setup is not None
            and (reboot or any(c.group in ("cmdline", "initramfs", "sriov") for c in changed))
        )
        or bool(args.undo and changed),
        "missing_kernel_args": reboot,
        "notes": list(setup.notes) if setup else [],
    }
    if setup is not None:
        doc["devices"] = [
            {"address": d.address, "partition": d.partition, "host_driver": d.host_driver}
            for d in setup.settings.devices
        ]
        doc["sriov"] = [
            {
                "pf": pf.address,
                "vfs": pf.vfs,
                "site_vfs": [
                    {
                        "index": v.index,
                        "address": v.address,
                        "partition": v.partition,
                        "settings": vf_settings_to_json(v.settings),
                    }
                    for v in pf.site_vfs
                ],
            }
            for pf in setup.settings.sriov
        ]
        doc["hugepages"] = {
            str(size): {str(n): c for n, c in nodes.items()}
            for size, nodes in setup.settings.hugepages.items()
        }
    if ctx.json:
        ctx.emit_json(doc)
        return 0
    _render_setup(ctx, args, change_list, doc)
    return 0


def _render_setup(
    ctx: Context, args: argparse.Namespace, change_list: list[FileChange], doc: dict[str, Any]
) -> None:
    verb = "would " if args.dry_run else ""
    if doc["kernel_args"]:
        ctx.say(f"kernel arguments: {' '.join(doc['kernel_args'])}")
    ctx.say(
        f"boot loader: {doc['bootloader']}; initramfs: {doc['initramfs']}; systemd: {'yes' if doc['systemd'] else 'no'}"
    )
    ctx.say()
    if not doc["changed"]:
        ctx.say(
            "nothing to change: "
            + (
                "nothing from host setup is there"
                if args.undo
                else "the files are as the site needs them"
            )
        )
    for c in change_list:
        if c.action == "unchanged":
            ctx.say(f"unchanged  {c.path}")
            continue
        ctx.say(f"{verb}{c.action:<8} {c.path}  ({c.purpose})")
        if args.dry_run and c.content is not None and c.action == "create":
            ctx.say("\n".join(f"    {line}" for line in c.content.splitlines()))
        elif c.diff:
            ctx.say("\n".join(f"    {line}" for line in c.diff.rstrip("\n").splitlines()))
    if doc["commands"]:
        ctx.say()
        if doc["commands_run"]:
            ctx.say("ran: " + "; ".join(doc["commands_run"]))
        else:
            where = "" if str(doc["root"]) == "/" else f" (in {doc['root']}'s system, e.g. chroot)"
            ctx.say(f"then run{where}: " + "; ".join(doc["commands"]))
    for note in doc["notes"]:
        ctx.note(note)
    if doc["reboot_needed"]:
        ctx.say(
            "reboot for these settings to take effect, then `partition host check "
            + (SITE_COPY if args.file in (None, "-") else args.file)
            + "`"
        )


# -- boot -----------------------------------------------------------------------------------


def run_boot(args: argparse.Namespace, ctx: Context) -> int:
    """Start the partitions with ``autostart: true``, in ``order`` (apply's start order), and
    leave the others as they are: the boot-time service, and the command for other init systems.
    What ``apply`` prepares and runs (the same checks, isolation included), less what does not
    start at boot (``apply.prepare``'s ``boot``)."""
    from partitioner.cli.apply import progress
    from partitioner.engine.prepare import converge, prepare
    from partitioner.record.model import running_partitions
    from partitioner.record.store import StateStore

    ctx.require_live("host boot")
    root = ctx.root()
    store = StateStore(ctx.state_dir)
    with store.lock("host boot", 600.0):
        prepared = prepare(
            args.file,
            root,
            store,
            act=True,
            boot=True,
            on_reconciled=lambda found: ctx.reconciled(found, done=True),
        )
        running = running_partitions(prepared.state)
        skipped = sorted(set(prepared.manifest.partitions) - set(prepared.plan.placements))
        for name in skipped:
            ctx.info(
                f"partition: {name} has autostart: false; `partition start {name}` after `apply` starts it"
            )
        if prepared.actions:
            converge(
                prepared,
                root=root,
                store=store,
                run_dir=ctx.run_dir,
                log_dir=ctx.log_dir,
                on_progress=progress(ctx),
            )
    started = [p.name for p in prepared.plan.start_order() if p.name not in running]
    if ctx.json:
        ctx.emit_json({"started": started, "skipped": skipped, "notes": prepared.notes})
    else:
        ctx.say(
            f"started: {', '.join(started) or 'none'}"
            + (f"; autostart: false: {', '.join(skipped)}" if skipped else "")
        )
    if not args.no_supervise:
        _supervise(ctx, store, poll=0.5)
    return 0


def _supervise(ctx: Context, store: Any, poll: float, how: str = "foreground") -> None:
    from partitioner.boot import watcher
    from partitioner.boot.supervisor import Supervisor
    from partitioner.cli.lifecycle import lifecycle_context
    from partitioner.engine.executor import execute
    from partitioner.engine.guests import Start
    from partitioner.errors import StateError
    from partitioner.record.model import State
    from partitioner.record.store import StateStore

    def restart(s: StateStore, state: State, name: str) -> State:
        # The same action as `partition start`: the recorded placement, pinned as before.
        actx = lifecycle_context(ctx, s, state)
        execute([Start(name)], actx, s)
        return actx.state

    def site_gone() -> bool:
        # One that apply started leaves with the last partition (destroy also ends it).
        try:
            return not store.load().partitions
        except StateError:
            return False

    detached = how != "foreground"
    mode: watcher.How = (
        "detached" if how == "detached" else "systemd" if how == "systemd" else "foreground"
    )
    root = ctx.root()
    waited = False

    def keep_waiting() -> bool:
        nonlocal waited
        if not waited:
            ctx.info(
                f"partition: another supervisor watches {store.dir}; waiting to take over from it"
            )
            waited = True
        return True

    with watcher.hold(root, store.dir, mode, wait=None if detached else keep_waiting) as mine:
        if not mine:
            ctx.info(f"partition: another supervisor watches {store.dir} already")
            return
        ctx.info(f"partition: watching the partitions of {store.dir} (on_crash)")
        Supervisor(root, store, restart).run(
            poll=poll, until=site_gone if detached else lambda: False
        )


def run_supervise(args: argparse.Namespace, ctx: Context) -> int:
    from partitioner.record.store import StateStore

    ctx.require_live("host supervise")
    _supervise(ctx, StateStore(ctx.state_dir), poll=args.poll, how=args.how)
    return 0
