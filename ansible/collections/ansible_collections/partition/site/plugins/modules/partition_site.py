#!/usr/bin/python
# Copyright: partition developers
# Apache License 2.0 (see the repository's LICENSE)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: partition_site
short_description: Converge a host to a partition site, or remove it
version_added: "0.1.0"
description:
  - Runs the C(partition) command on the managed host.
  - With O(state=present), C(partition apply SITE) reserves hugepages, claims devices and
    starts, changes or stops the partitions of the site.  It runs only when
    C(partition plan --json SITE) lists actions, so a converged host reports no change.
  - With O(state=absent), C(partition destroy SITE) stops the site's partitions and gives
    their CPUs, memory and devices back.
  - In check mode only the plan is made; C(changed) says whether apply or destroy would act.
    In diff mode the actions are shown.
  - On failure, C(rc) is partition's exit code (2 bad input, 3 does not fit the host,
    4 failed and put back, 5 could not put back, 6 busy) and C(msg) its message.
options:
  site:
    description: Path of the site manifest (site.yaml) on the managed host.
    type: path
    required: true
  state:
    description: Whether the site should run on the host or be gone from it.
    type: str
    choices: [present, absent]
    default: present
  executable:
    description: The partition command (a name on PATH or a path).
    type: str
    default: partition
attributes:
  check_mode:
    description: Makes the plan only, and says whether apply or destroy would act.
    support: full
  diff_mode:
    description: Shows the actions apply or destroy takes.
    support: full
author:
  - partition developers (@partition)
"""

EXAMPLES = r"""
- name: Run the site on every appliance
  partition.site.partition_site:
    site: /etc/partition/site.yaml

- name: Remove it
  partition.site.partition_site:
    site: /etc/partition/site.yaml
    state: absent
"""

RETURN = r"""
actions:
  description: What apply or destroy did, or would do in check mode (action, target, detail).
  returned: always
  type: list
  elements: dict
plan:
  description: The placement of each partition (C(partition plan --json)'s C(partitions)).
  returned: when state is present
  type: dict
rc:
  description: partition's exit code.
  returned: failure
  type: int
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.partition.site.plugins.module_utils.partition_cli import (
    run_json,
    run_partition,
)


def _line(action):
    return f"{action['action']:<18} {action['target']:<14} {action['detail']}"


def _diff(actions, what):
    text = "".join(f"{_line(a)}\n" for a in actions)
    return {"prepared": f"{what} would:\n{text}" if actions else ""}


def present(module):
    site = module.params["site"]
    planned = run_json(module, ["plan", site])
    actions = planned.get("actions", [])
    result = {"changed": bool(actions), "actions": actions, "plan": planned.get("partitions", {})}
    if module._diff:
        result["diff"] = _diff(actions, "apply")
    if not actions or module.check_mode:
        return result
    applied = run_json(module, ["apply", site])
    result["actions"] = applied.get("actions", actions)
    result["changed"] = bool(applied.get("applied"))
    return result


def absent(module):
    site = module.params["site"]
    # destroy --dry-run says "nothing to do", or lists its actions, one a line.
    out = run_partition(module, ["destroy", "--dry-run", site])[1]
    actions = []
    for line in out.splitlines():
        if line.startswith("  "):
            parts = line.split(None, 2)
            parts += [""] * (3 - len(parts))
            actions.append({"action": parts[0], "target": parts[1], "detail": parts[2]})
    result = {"changed": bool(actions), "actions": actions}
    if module._diff:
        result["diff"] = _diff(actions, "destroy")
    if not actions or module.check_mode:
        return result
    run_partition(module, ["destroy", site])
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            site=dict(type="path", required=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            executable=dict(type="str", default="partition"),
        ),
        supports_check_mode=True,
    )
    result = present(module) if module.params["state"] == "present" else absent(module)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
