"""Attested key transfer (PROTOCOL.md §3): the service that releases a key only after verification, binding, a
single-use nonce and the key's transfer policy (``keybroker.policy.engine``) all agree, and the evidence verifiers
it asks (local or a remote attestation service)."""
