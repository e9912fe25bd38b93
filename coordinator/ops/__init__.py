"""What the operator sees: metrics, the miners snapshot in PostgreSQL, the CLI's tables."""
