"""cosign-compatible signatures: keys, payloads, classic `.sig` layers, DSSE and bundles.

Pure and synchronous (bytes in, verdicts out): neither httpx nor trio is imported
here, so the registry side (finding `.sig` tags and bundle referrers, pushing
them) can be written and tested separately on top of these functions.

- keys: cosign public keys and the encrypted `cosign.key`; sign/verify per key type
- payload: the simple-signing payload a classic signature signs
- classic: verify, sign and append `.sig` layers
- dsse, bundle: DSSE envelopes, in-toto statements, sigstore bundles and their referrer
- trustroot, tlog, sct, keyless: offline keyless checks against a trusted-root file
- refusal, verdict: why a check failed (ranked reasons) and what a passed one vouches for
- trust: who must have signed (Trust) and the one rule over all of a digest's signatures
"""
