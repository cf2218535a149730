# Copyright: partition developers
# Apache License 2.0 (see the repository's LICENSE)
"""Running the ``partition`` command from a module: one place, as the CLI's exit codes say."""

from __future__ import annotations

import json

# cli.md's exit codes, for messages.
EXIT_MEANING = {
    1: "an unexpected failure (a bug in partition)",
    2: "bad input",
    3: "does not fit this host",
    4: "failed, and the host was put back as it was",
    5: "failed, and could not put everything back",
    6: "busy: another partition command holds the site",
}


def run_partition(module, args, check_rc=True):
    """Run ``partition ARGS``; return (rc, stdout, stderr).  With check_rc, a non-zero exit
    ends the module with partition's exit code and its own message."""
    executable = module.params.get("executable") or "partition"
    cmd = [module.get_bin_path(executable, required=True), *list(args)]
    rc, out, err = module.run_command(cmd)
    if rc != 0 and check_rc:
        fail(module, cmd, rc, out, err)
    return rc, out, err


def run_json(module, args):
    rc, out, err = run_partition(module, ["--json", *list(args)])
    try:
        return json.loads(out)
    except ValueError:
        module.fail_json(
            msg=f"partition {' '.join(args)} did not print one JSON document",
            rc=rc,
            stdout=out,
            stderr=err,
        )
    return None  # not reached: fail_json exits


def fail(module, cmd, rc, out, err):
    """The message partition gave (its last line on stderr, or the problems of a --json
    failure document), with its exit code as ``rc``."""
    problems = []
    try:
        doc = json.loads(out) if out.strip() else None
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("problems"):
        problems = [p if isinstance(p, str) else p.get("message", str(p)) for p in doc["problems"]]
    lines = [line for line in err.splitlines() if line.strip()]
    message = "; ".join(problems) or (lines[-1] if lines else "")
    if message.startswith("partition: "):
        message = message[len("partition: ") :]
    module.fail_json(
        msg=f"{message or 'partition failed'} (exit {rc}: {EXIT_MEANING.get(rc, 'failed')})",
        rc=rc,
        cmd=cmd,
        stdout=out,
        stderr=err,
        problems=problems or lines,
    )
