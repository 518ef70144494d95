"""The FUSE adapter: the only package (with daemon.py) that imports pyfuse3."""
