"""autocompress.compress."""
