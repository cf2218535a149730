"""partition: logical partitions for x86 Linux servers on KVM.

Data flows one way::

    site.yaml --load--> Manifest --+
                                   +--plan--> Plan --diff(State)--> [Action...] --> host
    /sys, /proc --scan--> Host ----+
"""

__version__ = "0.1.0"
