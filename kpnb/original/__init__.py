"""original."""
