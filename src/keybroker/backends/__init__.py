"""Where key material lives: the ``KeyStore``/``KeyWrapper`` Protocols (``base``), their implementations (embedded,
Vault/OpenBao KV and Transit, KMIP, PKCS#11) and ``registry``, which builds the configured ones by name."""
