"""The Vault / OpenBao backend: the authenticated session (``session``) and the KV store (``store``)."""
