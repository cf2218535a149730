"""An offline stand-in for pip's get-pip.py, for ansible-test's sanity environments.

ansible-test bootstraps pip into each of its virtual environments by downloading
get-pip.py from ci-files.testing.ansible.com.  Where that host cannot be reached
(this project's CI), tests/test_ansible.py puts this file where ansible-test
caches the download: it installs the pip that Python bundles (ensurepip), then
what ansible-test asked for, from the package index pip is configured with.
get-pip's own options and its pinned pip are dropped: the bundled pip serves.
"""

import ensurepip
import runpy
import sys

ensurepip.bootstrap(upgrade=True)
args = [
    a
    for a in sys.argv[1:]
    if a not in ("--no-setuptools", "--no-wheel") and not a.startswith("pip==")
]
if any(not a.startswith("-") for a in args):
    sys.argv = ["pip", "install", *args]
    runpy.run_module("pip", run_name="__main__", alter_sys=True)
