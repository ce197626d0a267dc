"""hotcopy workers."""
