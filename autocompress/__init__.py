"""autocompress: profile, search, apply, evaluate and report compression schedules for causal LMs."""

__version__ = "0.1.0"
