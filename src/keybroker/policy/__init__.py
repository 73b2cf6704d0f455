"""Key transfer policies (PROTOCOL.md §2): the schema, validated strictly at upload (``model``), their storage
(``store``), and the key policy engine that decides a transfer from verified claims (``engine``).

Two things are called "policy" in keybroker. These are *transfer* policies, attached to keys: JSON rules on
measurements, SVNs, TCB status and client permissions. The other kind are the attestation service's *appraisal*
policies (Rego, ``keybroker.attestation.appraisal``), evaluated over a quote's claims when a token is issued; a
transfer policy may require some of them by id (``policy_ids``).
"""
