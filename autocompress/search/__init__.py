"""autocompress.search."""
