"""OCI registry access: references, the HTTP client, auth, and local OCI layouts.

This package is the only one that imports httpx.
"""
