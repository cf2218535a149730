#!/usr/bin/python
# Copyright: partition developers
# Apache License 2.0 (see the repository's LICENSE)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: partition_facts
short_description: The host as partition sees it, as facts
version_added: "0.1.0"
description:
  - Runs C(partition inspect --json) on the managed host and returns it as the fact
    C(partition_host), with the CPUs (core, package, node), the NUMA nodes (memory and
    hugepage pools) and every PCI function (IOMMU group, and whether it can be assigned).
  - Changes nothing on the host.
options:
  executable:
    description: The partition command (a name on PATH or a path).
    type: str
    default: partition
attributes:
  check_mode:
    description: Reads only, in check mode as otherwise.
    support: full
  diff_mode:
    description: Nothing to show.
    support: none
  facts:
    description: Returns C(partition_host).
    support: full
author:
  - partition developers (@partition)
"""

EXAMPLES = r"""
- name: Read each host's CPUs, nodes and devices
  partition.site.partition_facts:

- name: Show the free 2 MiB pages of node 0
  ansible.builtin.debug:
    msg: "{{ partition_host.numa_nodes[0].hugepages['2MiB'].free }}"
"""

RETURN = r"""
ansible_facts:
  description: The facts.
  returned: always
  type: dict
  contains:
    partition_host:
      description: C(partition inspect --json) (cpus, numa_nodes, pci).
      type: dict
      returned: always
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.partition.site.plugins.module_utils.partition_cli import run_json


def main():
    module = AnsibleModule(
        argument_spec=dict(executable=dict(type="str", default="partition")),
        supports_check_mode=True,
    )
    host = run_json(module, ["inspect"])
    module.exit_json(changed=False, ansible_facts={"partition_host": host})


if __name__ == "__main__":
    main()
