"""Authentication of admin API callers (bearer tokens)."""
