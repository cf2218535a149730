"""``partition map``: the host's topology with every partition on it.

- :mod:`.owners`: who owns what (CPUs, memory, devices), built from the plain
  documents ``plan --json`` and ``status --json`` give, with a colour per owner.
- :mod:`.hwloc`: the picture drawn by hwloc's ``lstopo``, each object styled
  through its ``lstopoStyle`` attribute set with ``hwloc-annotate``.
- :mod:`.text`: the terminal form, one line per NUMA node.
"""
