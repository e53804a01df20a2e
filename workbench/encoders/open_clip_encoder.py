"""open_clip encoders (being written)."""
