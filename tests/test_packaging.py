"""The wheel, installed where neither the source tree nor the editable install can be seen, does the job.

The test environment's editable install hides packaging mistakes: its finder maps ``autocompress``
onto the source tree, so a package left out of pyproject.toml still imports. Here the wheel is
built from a clean copy of the project (a stale ``build/`` could smuggle files in) and unpacked
into a fresh virtual environment. That environment sees the test environment's dependencies
through a plain path line in a ``.pth`` file: a path line runs no code, so the editable finder
living there is never installed, and ``import autocompress`` fails until the wheel is in (checked).
Every command runs with its working directory outside the project, without PYTHONPATH and
without the user site.
"""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
FAST = ["--threads", "1"]
E2E_TIMEOUT = 300  # seconds per command: generous, for a loaded machine


# ---------------------------------------------------------------------------------------
# Building, installing, running


def _source_copy(target: Path, *, drop: tuple[str, ...] = ()) -> Path:
    """The project's top-level files and package directories copied to ``target``, without build
    leftovers; the packages in ``drop`` are struck from the copy's pyproject.toml."""
    target.mkdir(parents=True)
    for path in ROOT.iterdir():
        if path.is_file():
            shutil.copy2(path, target / path.name)
    for folder in {"autocompress", *SETUPTOOLS["package-dir"].values()}:
        shutil.copytree(ROOT / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if drop:
        text = (target / "pyproject.toml").read_text()
        for package in drop:
            line = f'    "{package}",\n'
            assert line in text, f"{package} is not listed as {line!r} in pyproject.toml"
            text = text.replace(line, "")
        (target / "pyproject.toml").write_text(text)
    return target


def _build_wheel(source: Path, out: Path) -> Path:
    """Build the wheel of ``source`` (an absolute path: a bare name would be looked up on the index)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(source.resolve())], check=True, capture_output=True, cwd=out.parent)
    wheels = list(out.glob("autocompress-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _expected_files(source: Path) -> set[str]:
    """Every file the wheel must hold, as its path inside the wheel: each package's modules and data."""
    mapping = {"autocompress": "autocompress", **SETUPTOOLS["package-dir"]}
    data = SETUPTOOLS.get("package-data", {})
    expected = set()
    for package, folder in mapping.items():
        patterns = ["**/*.py", *data.get(package, [])]
        for pattern in patterns:
            for path in (source / folder).glob(pattern):
                relative = path.relative_to(source / folder)
                if "__pycache__" not in relative.parts and not (package == "autocompress"
                                                                and relative.parts[0] in mapping.values()):
                    expected.add("/".join([*package.split("."), *relative.parts]))
    return expected


def _missing_from_wheel(wheel: Path, source: Path = ROOT) -> list[str]:
    """The files of ``source``'s packages that ``wheel`` does not hold."""
    with zipfile.ZipFile(wheel) as archive:
        held = set(archive.namelist())
    return sorted(_expected_files(source) - held)


@dataclass(frozen=True)
class FreshEnv:
    """A virtual environment holding nothing of the project but what a wheel put there."""

    root: Path
    work: Path  # the working directory of every command: outside the project

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def site(self) -> Path:
        return self.root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        return {**env, "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
                "HF_HUB_OFFLINE": "1", "PATH": f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}",
                "COLUMNS": "200"}

    def run(self, argv: list[str], *, check: bool = False, timeout: float = E2E_TIMEOUT):
        result = subprocess.run(argv, cwd=self.work, env=self.environ(), capture_output=True, text=True,
                                timeout=timeout)
        if check:
            assert result.returncode == 0, _describe(argv, result)
        return result

    def autocompress(self, *argv: str):
        """Run the installed console script; its output for an assertion message."""
        return self.run([str(self.root / "bin" / "autocompress"), *argv])


def _describe(argv, result) -> str:
    return f"{' '.join(map(str, argv))} -> {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _fresh_env(root: Path, work: Path) -> FreshEnv:
    """A venv without pip that sees the test environment's site-packages by a plain path line only."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True)
    work.mkdir(parents=True, exist_ok=True)
    env = FreshEnv(root, work)
    paths = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (env.site / "test-dependencies.pth").write_text("".join(f"{path}\n" for path in paths))
    probe = env.run([str(env.python), "-c", "import torch, transformers, optuna; import autocompress"])
    assert "No module named 'autocompress'" in probe.stderr, (
        "the fresh environment must see the dependencies but not the editable install:\n" + probe.stderr)
    return env


def _install(wheel: Path, env: FreshEnv) -> None:
    """Unpack ``wheel`` (pure Python) into the environment and write its console scripts, as pip does."""
    site = env.site
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
        info = next(name.split("/")[0] for name in archive.namelist() if name.endswith(".dist-info/WHEEL"))
    scripts = configparser.ConfigParser()
    scripts.read(site / info / "entry_points.txt")
    for name, target in scripts["console_scripts"].items():
        module, function = target.split(":")
        script = env.root / "bin" / name
        script.write_text(f"#!{env.python}\nimport sys\nfrom {module} import {function}\n"
                          f"sys.exit({function}())\n")
        script.chmod(0o755)


# ---------------------------------------------------------------------------------------
# Fixtures: one wheel, one environment, one tiny world for the whole module


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    return _build_wheel(_source_copy(root / "src"), root / "dist")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, wheel) -> FreshEnv:
    root = tmp_path_factory.mktemp("fresh")
    env = _fresh_env(root / "venv", root / "work")
    _install(wheel, env)
    return env


@pytest.fixture(scope="module")
def world(fresh, tokenizer) -> Path:
    """In the fresh environment's working directory: a tiny Llama, a tiny Qwen2 to transfer to,
    a text file and a two-choice search space."""
    for name, family in (("model", "llama"), ("target", "qwen2")):
        tiny_model(family).save_pretrained(fresh.work / name)
        tokenizer.save_pretrained(fresh.work / name)
    (fresh.work / "text.txt").write_text("\n\n".join(f"Paragraph {i} tells how the function returns a value. " * 5
                                                     for i in range(40)))
    (fresh.work / "space.yaml").write_text("name: tiny\ngroup_size: 32\nbits: [4, 16]\n")
    return fresh.work


# ---------------------------------------------------------------------------------------
# The tests


def test_every_package_is_listed_in_pyproject():
    listed = set(SETUPTOOLS["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "autocompress").rglob("__init__.py")}
    found |= {"autocompress.kernels", "autocompress.search_spaces"}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_the_wheel_holds_every_module_kernel_and_space(wheel):
    assert _missing_from_wheel(wheel) == []
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "autocompress/kernels/packing.py" in names and "autocompress/search_spaces/default.yaml" in names
    assert not any(name.startswith(("kernels/", "search_spaces/", "tests/")) for name in names), \
        "kernels and spaces belong inside autocompress/, tests nowhere"


def test_installed_package_is_the_wheel_not_the_source(fresh):
    probe = ("import autocompress, autocompress.kernels.packing, importlib.resources as r;"
             "print(autocompress.__file__);"
             "print(sorted(p.name for p in r.files('autocompress.search_spaces').iterdir()))")
    result = fresh.run([str(fresh.python), "-c", probe], check=True)
    location, spaces = result.stdout.splitlines()
    assert Path(location).is_relative_to(fresh.root) and not Path(location).is_relative_to(ROOT), location
    assert "default.yaml" in spaces and "quant-only.yaml" in spaces


def test_help_of_the_command_and_every_verb(fresh):
    from autocompress.cli import build_parser

    verbs = next(a for a in build_parser()._actions if a.dest == "verb").choices
    assert {"profile", "search", "apply", "eval", "report", "transfer"} <= set(verbs)
    result = fresh.autocompress("--help")
    assert result.returncode == 0 and all(verb in result.stdout for verb in verbs), _describe(["--help"], result)
    for verb in verbs:
        result = fresh.autocompress(verb, "--help")
        assert result.returncode == 0 and f"usage: autocompress {verb}" in result.stdout, \
            _describe([verb, "--help"], result)


def test_every_verb_end_to_end_on_a_tiny_model(fresh, world):
    steps = [
        (["profile", "model", "--data", "text.txt", "--space", "space.yaml", "--out", "run", "--tokens", "128",
          "--seq-len", "64", "--no-roles", "--no-proxies", "--calib-tokens", "128", "--calib-seq-len", "64"],
         ["run/profile.json"]),
        (["search", "run", "--budget", "memory=60%", "--space", "space.yaml", "--trials", "2",
          "--holdout-tokens", "128", "--window", "64", "--no-progress"], ["run/schedule.json", "run/search.json"]),
        (["apply", "run", "--data", "text.txt", "--calib-tokens", "128", "--seq-len", "64", "--valid-tokens", "128"],
         ["run/model/model.safetensors", "run/model/autocompress.json"]),
        (["eval", "run/model", "--data", "text.txt", "--split", "calibration", "--tokens", "128", "--window", "64",
          "--decode-tokens", "2", "--out", "run/eval.json"], ["run/eval.json"]),
        (["report", "run"], ["run/report.html"]),
        (["transfer", "run", "target", "--budget", "memory=60%", "--signature-tokens", "0", "--check-tokens", "0",
          "--out", "moved"], ["moved/schedule.json"]),
    ]
    for argv, artifacts in steps:
        full = argv if argv[0] == "report" else [*argv, *FAST]
        result = fresh.autocompress(*full)
        assert result.returncode == 0, _describe(full, result)
        for artifact in artifacts:
            assert (world / artifact).is_file(), f"{argv[0]} did not write {artifact}"
    assert "Traceback" not in result.stderr


def test_a_package_left_out_of_pyproject_fails_these_checks(tmp_path, world):
    """The acceptance: a pyproject.toml without autocompress.transfer gives a wheel that fails here."""
    source = _source_copy(tmp_path / "src", drop=("autocompress.transfer",))
    broken = _build_wheel(source, tmp_path / "dist")
    missing = _missing_from_wheel(broken, source)
    assert "autocompress/transfer/transfer.py" in missing, missing
    env = _fresh_env(tmp_path / "venv", world)  # the tiny world of the other tests, not copied
    _install(broken, env)
    result = env.autocompress("transfer", "run", "target", "--budget", "memory=60%", "--signature-tokens", "0",
                              "--check-tokens", "0", "--out", "moved-broken", *FAST)
    assert result.returncode != 0 and "autocompress.transfer" in result.stderr, _describe(["transfer"], result)
