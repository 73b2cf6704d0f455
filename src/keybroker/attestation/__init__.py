"""Attestation: DCAP quote parsing and verification (with cached Intel collateral), appraisal policies, nonces and
signed attestation tokens. Verification (signatures, chains, collateral, binding) is kept apart from appraisal
(policies over the verified claims)."""
