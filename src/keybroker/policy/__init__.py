"""Key transfer policies: the schema (validated strictly at upload) and their storage."""
