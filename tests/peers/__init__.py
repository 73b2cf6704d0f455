"""Real peer servers for tests (SoftHSM2, OpenBao, the PyKMIP server, nginx), started on 127.0.0.1 and stopped by
the fixtures that start them. Nothing here is a fake: each helper runs the real program."""
