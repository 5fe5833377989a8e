"""Search spaces of the tests: the built-in spaces as they were before GPTQ act-order, group
lists and embedding units became the default (round-to-nearest, groups of 128, 2 to 16 bits).

Tests whose point is not the quantizer use these: RTN keeps them fast, one group size keeps
the plain ``bits=3`` labels, and 2-bit widths give the strong contrasts they assert on.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from autocompress.search.space import SearchSpace, space_from_dict

RTN_QUANT = {"granularity": "block", "group_size": 128, "method": "rtn", "bits": [2, 3, 4, 8, 16], "frozen": []}
SPACES = {
    "rtn-quant-only": RTN_QUANT,
    "rtn-quant-linear": {**RTN_QUANT, "granularity": "linear", "tie": [["q", "k", "v"], ["gate", "up"]]},
    "rtn-default": {**RTN_QUANT, "sparsity": [0.5], "two_four": True, "head_ratio": [0.25, 0.5],
                    "channel_ratio": [0.25, 0.5], "drop": True},
}


def rtn_space(name: str = "rtn-quant-only", **changes) -> SearchSpace:
    """One of :data:`SPACES` (``changes`` override its fields), as a SearchSpace."""
    return space_from_dict({"name": name, **SPACES[name], **changes}, "test")


def space_file(directory: Path, name: str = "rtn-quant-only", **changes) -> str:
    """One of :data:`SPACES` written as ``DIRECTORY/NAME.yaml`` (for the CLI and search settings)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **SPACES[name], **changes}))
    return str(path)
