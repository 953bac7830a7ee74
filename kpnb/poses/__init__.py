"""poses."""
