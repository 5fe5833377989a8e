"""One module per CLI verb. Each defines ``register(verbs)``: add its sub-parser and set ``run``.

The verbs are listed in :data:`VERBS`; :func:`autocompress.cli.build_parser` registers those
whose module is present. Modules import heavy libraries inside ``run`` only, so ``--help``
stays fast.
"""

VERBS = ("profile", "search", "apply", "eval", "export", "report", "transfer", "demo")
