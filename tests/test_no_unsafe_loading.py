"""No code runs from a file: the shipped source never unpickles, never loads unsafe YAML, never trusts remote code.

Models, checkpoints, artifacts and search spaces come from users and the hub, so every loader
must be one that only reads data. The source is scanned as syntax (comments and docstrings may
name pickle freely): pickle and its relatives are never imported, ``torch.load`` always has
``weights_only=True``, ``yaml.load`` always a safe loader, and ``trust_remote_code=True`` is never
written into the code (the user passes ``--trust-remote-code``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("autocompress", "kernels", "search_spaces")  # what the wheel holds (pyproject's package-dir)
PICKLING = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "joblib"}
SAFE_YAML = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST) -> str:
    """``torch.serialization.load`` for the expression naming it ('' for anything else)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def problems(source: str, where: str = "<source>") -> list[str]:
    """Every unsafe load in ``source``, as ``where:line: what``."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> what it was imported as, e.g. load -> torch.load
    found = []

    def say(node: ast.AST, what: str) -> None:
        found.append(f"{where}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
                if alias.name.split(".")[0] in PICKLING:
                    say(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            if node.module.split(".")[0] in PICKLING:
                say(node, f"imports from {node.module}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if "pickle" in name.lower() and not isinstance(getattr(node, "ctx", None), ast.Store):
                say(node, f"uses {name}")
        if isinstance(node, ast.keyword) and node.arg and "pickle" in node.arg.lower():
            say(node.value, f"passes {node.arg}=")
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and _is_true(node.value):
            say(node.value, "hard-codes trust_remote_code=True")
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_true(value):
                    say(node, "hard-codes trust_remote_code: True")
        if isinstance(node, ast.arguments):
            positional = node.posonlyargs + node.args
            pairs = list(zip(positional[len(positional) - len(node.defaults):], node.defaults))
            pairs += [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None]
            if any(arg.arg == "trust_remote_code" and _is_true(default) for arg, default in pairs):
                say(node.args[0] if node.args else node.kwonlyargs[0], "defaults trust_remote_code to True")
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, rest = name.partition(".")
            name = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("torch.load", "torch.serialization.load") and not _is_true(keywords.get("weights_only")):
                say(node, f"calls {name} without weights_only=True")
            if name in ("torch.jit.load", "torch.package.PackageImporter"):
                say(node, f"calls {name} (it runs code from the file)")
            if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all",
                        "yaml.full_load_all"):
                say(node, f"calls {name}")
            if name == "yaml.load":
                loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
                if _dotted(loader).split(".")[-1] not in SAFE_YAML:
                    say(node, "calls yaml.load without a safe Loader")
    return found


def _shipped_sources() -> list[Path]:
    return sorted(p for folder in SHIPPED for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_the_shipped_source_loads_nothing_unsafely():
    files = _shipped_sources()
    assert len(files) > 50 and any(p.name == "cli.py" for p in files)
    found = [line for path in files for line in problems(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("source", [
    "import pickle",
    "import pickle as p",
    "from pickle import loads",
    "import dill",
    "import joblib\njoblib.load(path)",
    "import torch\ntorch.load(path)",
    "import torch\ntorch.load(path, weights_only=False)",
    "import torch\ntorch.load(path, map_location='cpu', weights_only=flag)",
    "from torch import load\nload(path)",
    "import torch as t\nt.load(path)",
    "import torch\ntorch.serialization.load(path)",
    "import torch\ntorch.jit.load(path)",
    "import numpy as np\nnp.load(path, allow_pickle=True)",
    "import pandas as pd\npd.read_pickle(path)",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load(text)",
    "import yaml\nyaml.full_load(text)",
    "AutoModel.from_pretrained(name, trust_remote_code=True)",
    "kwargs = {'trust_remote_code': True}",
    "def load(name, trust_remote_code=True): pass",
    "def load(name, *, trust_remote_code=True): pass",
])
def test_the_scan_catches(source):
    assert problems(source), source


@pytest.mark.parametrize("source", [
    '"""No pickle is involved anywhere."""',
    "# never pickle",
    "import torch\ntorch.load(path, weights_only=True)",
    "import torch\ntorch.load(path, map_location='cpu', weights_only=True)",
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "AutoModel.from_pretrained(name, trust_remote_code=args.trust_remote_code)",
    "def load(name, trust_remote_code=False): pass",
    "import safetensors.torch\nsafetensors.torch.load_file(path)",
])
def test_the_scan_passes(source):
    assert problems(source) == []
