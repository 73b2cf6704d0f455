"""The simulated TEE: an Intel-shaped test PKI, platforms, and collateral in Intel's formats, so that the real
verifier runs unchanged without SGX/TDX hardware. Trusted only when ``attestation.simulated_root`` names its root.
The byte-level specification is dcap-test-pki.md."""
