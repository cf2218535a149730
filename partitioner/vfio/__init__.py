"""The device side: claim PCI functions (whole IOMMU groups) for vfio-pci and give them back.

- :mod:`partitioner.vfio.claim`: ``claim_group`` / ``release_group`` through sysfs, with the
  original drivers recorded in a ``GroupClaim`` (stored in the state file).
- :mod:`partitioner.vfio.ioctl`: ``check_group``, the kernel's own word on viability and
  reset, through the VFIO ioctls (cffi).  Imported on demand: it loads libc.
- :mod:`partitioner.vfio.preview`: ``claim_preview``, the one verdict on a function (may it be
  assigned, what comes with it), which inspect, plan and apply all ask.
"""

from partitioner.vfio.claim import (
    ClaimFailed,
    FunctionRecord,
    GroupClaim,
    claim_group,
    release_group,
)
from partitioner.vfio.preview import ClaimPreview, claim_preview

__all__ = [
    "ClaimFailed",
    "ClaimPreview",
    "FunctionRecord",
    "GroupClaim",
    "claim_group",
    "claim_preview",
    "release_group",
]
