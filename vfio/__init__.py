"""The device side: claim PCI functions (whole IOMMU groups) for vfio-pci and give them back."""
