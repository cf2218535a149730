"""The guest runtime: QEMU's command line, QMP, launching paused and pinned, powering down.

``caps.probe_qemu`` asks QEMU what it supports, ``argv.qemu_argv`` is the pure
command line, ``launch.launch`` starts a partition pinned and running, and
``launch.powerdown`` stops it.  ``qmp.Qmp`` is the one place that talks to QEMU.
"""

# Nothing is imported here: QEMU's QMP library pulls in asyncio, which a quick verb
# (a no-op apply, status) should not pay for.  Import the modules themselves.
