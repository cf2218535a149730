"""Holding what the plan gave at run time: the host's own work kept off the partitions' CPUs.

``layout`` is the pure description of who owns which CPU (shared with the boot-time
``host setup``); ``view`` reads tasks, interrupts and the workqueue mask through the
HostRoot; ``moves`` computes what goes where; ``runtime`` holds the actions apply runs,
with the record of every value they replaced; ``cgroup`` places each partition's QEMU
in a cgroup of its own.
"""
