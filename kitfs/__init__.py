"""kitfs: mount KitOps ModelKits from OCI registries as lazy read-only filesystems."""

__version__ = "0.1.0"
