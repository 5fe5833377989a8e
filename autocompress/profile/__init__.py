"""autocompress.profile."""
