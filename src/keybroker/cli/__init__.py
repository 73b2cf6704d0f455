"""The ``keybroker`` admin CLI. Remote commands talk to the REST API; only init/serve/config touch local state."""
