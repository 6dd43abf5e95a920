"""Provider adapters: one module per ``endpoints.N.kind`` (see base.py)."""
