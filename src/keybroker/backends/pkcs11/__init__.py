"""The PKCS#11 backend: a KEK inside an HSM token (the contract is in ``wrapper``)."""
