"""cosign-compatible signatures: keys, payloads, classic `.sig` layers, DSSE and bundles.

Pure and synchronous (bytes in, verdicts out): neither httpx nor trio is imported
here, so the registry side (finding `.sig` tags and bundle referrers, pushing
them) can be written and tested separately on top of these functions.
"""
