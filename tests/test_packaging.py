"""A non-editable install works as well as the editable one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_ships_kernels_spaces_and_the_command(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    assert (target / "autocompress" / "kernels" / "packing.py").exists()
    assert not (target / "kernels").exists(), "kernels must not be a top-level module"
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = ("import autocompress, autocompress.kernels, importlib.resources as r;"
             "assert str(target) in autocompress.__file__, autocompress.__file__;"
             "print(sorted(p.name for p in r.files('autocompress.search_spaces').iterdir()))").replace(
        "str(target)", repr(str(target)))
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    help_run = subprocess.run([str(target / "bin" / "autocompress"), "--help"], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
    assert help_run.returncode == 0 and "eval" in help_run.stdout, help_run.stderr


def test_every_package_is_listed_in_pyproject():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "autocompress").rglob("__init__.py")}
    found |= {"autocompress.kernels", "autocompress.search_spaces"}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
