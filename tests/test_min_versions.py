"""The lower bounds pyproject.toml declares are the oldest releases with what the code uses.

``FLOORS`` says, for every runtime dependency, what sets its lower bound and a feature the code
needs from it. The tests check that pyproject.toml declares exactly those bounds, that
constraints-min.txt pins the same versions (``make test-min`` runs tests against them), that
each feature is there in the installed release, and that the package imports nothing it does not
declare (and declares nothing it does not import). When the code starts to use something newer,
add it here and raise the bound with it.
"""
from __future__ import annotations

import ast
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Floor:
    """A dependency's lower bound, why it is that, and one feature it must have (``module:attr.path``)."""

    package: str
    version: str
    why: str
    feature: str


FLOORS = (
    Floor("torch", "2.4", "Linux builds before 2.4 pin triton 2.x, the kernels need triton 3.0 (transformers 5.0 "
          "itself needs torch 2.2; the code's newest call, the post-accumulate grad hook, is 2.1)",
          "torch:Tensor.register_post_accumulate_grad_hook"),
    Floor("transformers", "5.0", "transformers.initialization (loading a compressed model), dtype= in "
          "from_pretrained, tokenizers as TokenizersBackend", "transformers.initialization:no_init_weights"),
    Floor("gguf", "0.11", "numpy quantize/dequantize of the legacy types (0.10 has them, but imports "
          "sentencepiece without declaring it; 0.11 declares it)", "gguf.quants:quantize"),
    Floor("accelerate", "1.1", "transformers loads a GGUF file (the smollm2-135m alias) only with accelerate, "
          "and 1.1.0 is the oldest it accepts (ACCELERATE_MIN_VERSION)", "accelerate:init_empty_weights"),
    Floor("safetensors", "0.4.3", "transformers 5.0 requires it (safe_open metadata and SafetensorError are older)",
          "safetensors:SafetensorError"),
    Floor("optuna", "5.0", "Trial.set_constraint carries the search's budgets", "optuna.trial:Trial.set_constraint"),
    Floor("scikit-learn", "1.3", "KMeans, TruncatedSVD, TfidfTransformer, Ridge, RandomForestRegressor as called",
          "sklearn.cluster:KMeans"),
    Floor("rich", "13", "Progress with MofNCompleteColumn", "rich.progress:MofNCompleteColumn"),
    Floor("triton", "3.0", "tl.join and tl.permute in the kernels", "triton.language:join"),
    Floor("pyyaml", "6", "safe_load of the search spaces", "yaml:safe_load"),
    Floor("plotly", "5.20", "the report's figures (add_hline, make_subplots, get_plotlyjs)",
          "plotly.graph_objects:Figure.add_hline"),
    Floor("numpy", "1.24", "array code of calibration, probes and the search", "numpy:errstate"),
    Floor("scipy", "1.10", "spearmanr(...).statistic (1.9), linalg.solve(assume_a=), sparse CSR",
          "scipy.stats:spearmanr"),
    # `autocompress serve`: bounds as its change declared them; what it calls is older than both.
    Floor("starlette", "0.37", "Starlette(routes=[Route(...)]), Request, JSON/HTML/Streaming responses",
          "starlette.responses:StreamingResponse"),
    Floor("uvicorn", "0.29", "uvicorn.Server(uvicorn.Config(...)).run(sockets=...) and .started", "uvicorn:Server"),
)
# Imported by the package but installed by a declared dependency (or optional: datasets is imported
# only for dataset specs, with a message naming the package).
TRANSITIVE = {"huggingface_hub": "transformers", "sqlalchemy": "optuna", "threadpoolctl": "scikit-learn",
              "datasets": None}
IMPORT_NAMES = {"scikit-learn": "sklearn", "pyyaml": "yaml"}
# Declared but never imported by the package: needed by a dependency on one of our paths.
RUNTIME_ONLY = {"accelerate": "transformers' GGUF loader (the smollm2-135m alias)"}


def declared(extras: bool = False) -> dict[str, Requirement]:
    """pyproject.toml's runtime dependencies by name (with ``extras``, the optional ones but dev too)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the floors do not change with Python
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    if extras:
        lines += [line for extra, more in project.get("optional-dependencies", {}).items() if extra != "dev"
                  for line in more]
    return {(r := Requirement(line)).name: r for line in lines}


def lower_bound(requirement: Requirement) -> Version:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"{requirement}: give exactly one lower bound (>=)"
    return bounds[0]


def test_pyproject_declares_exactly_the_floors():
    floors = {f.package: Version(f.version) for f in FLOORS}
    assert len(floors) == len(FLOORS), "one floor per package"
    bounds = {name: lower_bound(requirement) for name, requirement in declared().items()}
    assert bounds == floors


def test_constraints_min_pins_the_floors():
    pins = {}
    for line in (ROOT / "constraints-min.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip()] = Version(version.strip())
    assert pins == {f.package: Version(f.version) for f in FLOORS}


@pytest.mark.parametrize("floor", FLOORS, ids=lambda f: f.package)
def test_the_feature_that_sets_each_floor_is_there(floor):
    module_name, _, path = floor.feature.partition(":")
    if floor.package == "triton":
        pytest.importorskip("triton", reason="Triton is Linux-only (the PyTorch reference runs elsewhere)")
    value = importlib.import_module(module_name)
    for attribute in path.split("."):
        value = getattr(value, attribute)
    assert value is not None


def _imported_packages() -> set[str]:
    """Top-level third-party modules the package and its kernels import."""
    names = set()
    for path in [*(ROOT / "autocompress").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "autocompress"}


def test_the_package_imports_what_it_declares_and_nothing_else():
    imported = _imported_packages() - set(TRANSITIVE)
    runtime = {IMPORT_NAMES.get(name, name) for name in declared()}
    optional = {IMPORT_NAMES.get(name, name) for name in declared(extras=True)}
    assert imported - optional == set(), "imported but not declared in pyproject.toml"
    assert runtime - imported - set(RUNTIME_ONLY) == set(), "declared but never imported"
    assert set(RUNTIME_ONLY) <= runtime and not set(RUNTIME_ONLY) & imported
    assert all(via is None or via in declared() for via in TRANSITIVE.values())
