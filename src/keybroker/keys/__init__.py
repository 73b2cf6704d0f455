"""Keys: specifications, material (never printed), records and the service that manages them."""
