"""transformers vision towers (being written)."""
