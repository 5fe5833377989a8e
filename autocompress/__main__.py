"""``python -m autocompress``: the same as the ``autocompress`` command."""
import sys

from .cli import main

sys.exit(main())
