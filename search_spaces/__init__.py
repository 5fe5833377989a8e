"""Built-in search spaces, shipped as YAML package data."""
