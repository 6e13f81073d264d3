"""Model families; see registry.py."""
