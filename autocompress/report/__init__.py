"""autocompress.report."""
