"""alignsam."""
