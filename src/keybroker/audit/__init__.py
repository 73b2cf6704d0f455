"""The tamper-evident audit log: every admin action, every refusal and (later) every key transfer decision."""
