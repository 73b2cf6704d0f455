"""keybroker: a Key Broker Service that releases keys only to attested Intel SGX / TDX workloads."""

__version__ = "0.1.0"
