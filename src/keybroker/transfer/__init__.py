"""Attested key transfer (PROTOCOL.md §3): the key policy engine, wrapping for the workload, and the service that
releases a key only after verification, binding, a single-use nonce and the key's transfer policy all agree."""
