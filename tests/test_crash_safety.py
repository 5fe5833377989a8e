"""Crash safety: a verb killed with SIGKILL at a chosen point leaves its run directory as before
(or with complete files only), or resumable; a rerun gives what an uninterrupted run gives.

Each case runs one verb as a subprocess, ``python -c DRIVER``: the driver wraps one function
(``os.replace``, ``safetensors.torch.save_file``, ``shutil.rmtree``) so that at its N-th call
on a matching path the process sends itself SIGKILL (before the call, after it, or after it
with the written file cut in half, a write killed midway), then calls ``autocompress.cli.main``.
No hook lives in the product code. Then the run directory is checked (no half file under a
final name), the verb is run again in-process, and its result compared with an uninterrupted
run's: the same profile, the same schedule, the same logits within 1e-6, the same report.

``search`` is covered by ``tests/test_search.py::test_sigkill_then_resume_loses_no_completed_trial``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from autocompress.cli import main

SPACE = "name: tiny\ngroup_size: 32\nbits: [4, 16]\n"
PROFILE = ["--space", "space.yaml", "--data", "text.txt", "--tokens", "128", "--seq-len", "64", "--no-roles",
           "--no-proxies", "--calib-tokens", "128", "--calib-seq-len", "64", "--threads", "1"]
SEARCH = ["--budget", "memory=60%", "--space", "space.yaml", "--trials", "2", "--holdout-tokens", "128",
          "--window", "64", "--no-progress", "--threads", "1", "--storage", "run/study.journal"]
APPLY = ["--data", "text.txt", "--calib-tokens", "128", "--seq-len", "64", "--valid-tokens", "128", "--threads", "1"]
STAGED = [*APPLY, "--staged", "--step-fraction", "0.1", "--recovery", "never", "--no-step-gate"]

DRIVER = r"""
import importlib, json, os, signal, sys
spec = json.loads(sys.argv[1])
module_name, _, attr = spec["target"].rpartition(".")
module = importlib.import_module(module_name)
original = getattr(module, attr)
seen = 0

def die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def wrapper(*args, **kwargs):
    global seen
    hit = spec["match"] in " ".join(str(a) for a in args)
    seen += hit
    chosen = hit and seen == spec["nth"]
    if chosen and spec["when"] == "before":
        die()
    result = original(*args, **kwargs)
    if chosen and spec["when"] == "half":  # the file the call wrote, cut where a killed write would stop
        path = str(args[1])
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
    if chosen:
        die()
    return result

setattr(module, attr, wrapper)
from autocompress.cli import main
sys.exit(main(spec["argv"]))
"""


def _kill(cwd: Path, argv: list[str], target: str, match: str, nth: int = 1, when: str = "before") -> None:
    """Run ``autocompress ARGV`` in ``cwd``, killed with SIGKILL at the ``nth`` call of ``target`` on a
    path holding ``match``; fails unless the kill happened."""
    spec = {"target": target, "match": match, "nth": nth, "when": when, "argv": argv}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (f"not killed at {target} #{nth} on {match!r} (exit "
                                                f"{proc.returncode}): {proc.stderr[-2000:]}")


def _files(root: Path) -> dict[str, str]:
    """Every file under ``root``: relative path -> sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _visible(root: Path) -> dict[str, str]:
    """:func:`_files` without temp files and folders (names starting with a dot, which a crash may leave)."""
    return {k: v for k, v in _files(root).items() if not any(part.startswith(".") for part in Path(k).parts)}


def _complete(root: Path) -> None:
    """Every visible JSON file parses and every visible safetensors file opens: no half file."""
    from safetensors import safe_open

    for name in _visible(root):
        if name.endswith(".json"):
            json.loads((root / name).read_text())
        elif name.endswith(".safetensors"):
            with safe_open(str(root / name), "pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)


TOKENS = torch.arange(0, 384, 3).reshape(2, 64)


def _logits(model_dir: Path) -> torch.Tensor:
    from autocompress.compress.saving import load_compressed

    model, _ = load_compressed(model_dir)
    with torch.no_grad():
        return model(TOKENS).logits


def _same_model(got: Path, want: Path) -> None:
    assert json.loads((got / "schedule.json").read_text())["data"]["units"] == \
        json.loads((want / "schedule.json").read_text())["data"]["units"]
    assert torch.allclose(_logits(got), _logits(want), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer) -> Path:
    """model/, text.txt, space.yaml, run/ (profiled and searched) and the uninterrupted results:
    ref/profile.json, ref/model (apply), ref/staged (apply --staged), ref/report.html."""
    root = tmp_path_factory.mktemp("crash")
    tiny_model("llama").save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "text.txt").write_text("\n\n".join(f"Paragraph {i} tells how the function returns a value. " * 5
                                               for i in range(40)))
    (root / "space.yaml").write_text(SPACE)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert main(["profile", "model", "--out", "run", *PROFILE]) == 0
        assert main(["search", "run", *SEARCH]) == 0
        (root / "ref").mkdir()
        shutil.copy(root / "run" / "profile.json", root / "ref" / "profile.json")
        shutil.copytree(root / "run", root / "clean")  # the run before apply, staged or report
        assert main(["apply", "run", *APPLY]) == 0
        shutil.move(root / "run" / "model", root / "ref" / "model")
        assert main(["apply", "run", *STAGED]) == 0
        shutil.move(root / "run" / "model", root / "ref" / "staged")
        shutil.rmtree(root / "run")
    return root


def _run_copy(world: Path, tmp_path: Path) -> Path:
    """A fresh copy of the world's files with run/ as before apply, next to ``tmp_path``."""
    for name in ("model", "text.txt", "space.yaml"):
        (tmp_path / name).symlink_to(world / name)
    shutil.copytree(world / "clean", tmp_path / "run")
    return tmp_path / "run"


def _profile_json(path: Path) -> dict:
    data = json.loads(path.read_text())["data"]
    data.pop("seconds", None)
    data.get("meta", {}).pop("cpu_seconds", None)
    data.get("meta", {}).pop("timings", None)
    data.get("meta", {}).pop("cpu_timings", None)
    return data


@pytest.mark.parametrize("target,match,nth,when", [
    ("os.replace", "calibration.safetensors", 1, "after"),  # the run's rows saved, nothing measured yet
    ("autocompress.profile.run._measure_unit", "", 2, "before"),  # one unit measured, the second not
    ("os.replace", "profile.json", 1, "before"),  # everything measured, profile.json not yet in place
])
def test_killed_profile_leaves_complete_files_and_a_rerun_gives_the_same_profile(world, tmp_path, monkeypatch,
                                                                                  target, match, nth, when):
    for name in ("model", "text.txt", "space.yaml"):
        (tmp_path / name).symlink_to(world / name)
    _kill(tmp_path, ["profile", "model", "--out", "run", *PROFILE], target, match, nth, when)
    run = tmp_path / "run"
    assert not (run / "profile.json").exists()
    _complete(run)
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "model", "--out", "run", *PROFILE]) == 0
    assert _profile_json(run / "profile.json") == _profile_json(world / "ref" / "profile.json")


def _spy_measured(monkeypatch) -> list[str]:
    """The names of the units ``profile`` measures from now on (in this process)."""
    from autocompress.profile import run as profile_run

    measured: list[str] = []
    original = profile_run._measure_unit

    def spy(trace, model, ref, *args, **kwargs):
        measured.append(ref.name)
        return original(trace, model, ref, *args, **kwargs)

    monkeypatch.setattr(profile_run, "_measure_unit", spy)
    return measured


UNITS = [f"model.layers.{i}" for i in range(3)]


@pytest.mark.parametrize("when,reused", [
    ("after", 2),  # two units finished and kept, the third not measured
    ("half", 1),  # the second unit's file cut in half (a damaged disk): measured again, never a traceback
])
def test_killed_profile_resumes_with_the_units_it_finished(world, tmp_path, monkeypatch, capsys, when, reused):
    for name in ("model", "text.txt", "space.yaml"):
        (tmp_path / name).symlink_to(world / name)
    _kill(tmp_path, ["profile", "model", "--out", "run", *PROFILE], "os.replace", "profile.units", 2, when)
    run = tmp_path / "run"
    assert not (run / "profile.json").exists()
    assert sorted(p.name for p in (run / "profile.units").glob("[!.]*")) == [f"{u}.json" for u in UNITS[:2]]
    if when == "after":
        _complete(run)
    monkeypatch.chdir(tmp_path)
    measured = _spy_measured(monkeypatch)
    capsys.readouterr()
    assert main(["profile", "model", "--out", "run", *PROFILE]) == 0
    assert measured == UNITS[reused:]
    assert f"reusing {reused} finished units of 3" in capsys.readouterr().err
    assert _profile_json(run / "profile.json") == _profile_json(world / "ref" / "profile.json")
    assert not (run / "profile.units").exists()


def _interrupted_profile(monkeypatch, argv: list[str], units: int) -> None:
    """Run ``profile ARGV`` in this process, stopped (an exception) when it starts measuring unit ``units + 1``."""
    from autocompress.profile import run as profile_run

    original, seen = profile_run._measure_unit, []

    def stop_after(*args, **kwargs):
        if len(seen) == units:
            raise RuntimeError("stopped")
        seen.append(1)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(profile_run, "_measure_unit", stop_after)
        with pytest.raises(RuntimeError, match="stopped"):
            main(["profile", "model", "--out", "run", *argv])


@pytest.mark.parametrize("change", ["space", "force"])
def test_finished_units_of_other_inputs_or_with_force_are_measured_again(world, tmp_path, monkeypatch, change):
    """Units kept for another search space are never mixed into this one's profile; --force ignores them."""
    for name in ("model", "text.txt", "space.yaml"):
        (tmp_path / name).symlink_to(world / name)
    (tmp_path / "other.yaml").write_text("name: tiny\ngroup_size: 32\nbits: [8, 16]\n")
    monkeypatch.chdir(tmp_path)
    first = [*PROFILE, "--space", "other.yaml"] if change == "space" else PROFILE
    _interrupted_profile(monkeypatch, first, units=2)
    assert len(list((tmp_path / "run" / "profile.units").glob("model.layers.*.json"))) == 2
    measured = _spy_measured(monkeypatch)
    assert main(["profile", "model", "--out", "run", *PROFILE, *(["--force"] if change == "force" else [])]) == 0
    assert measured == UNITS
    assert _profile_json(tmp_path / "run" / "profile.json") == _profile_json(world / "ref" / "profile.json")
    assert not (tmp_path / "run" / "profile.units").exists()


@pytest.mark.parametrize("target,match,nth,when,overwrite", [
    ("safetensors.torch.save_file", "model.safetensors", 1, "half", False),  # inside the weights' write
    ("os.replace", ".part", 1, "before", False),  # the full folder written, not yet renamed
    ("os.replace", ".part", 1, "before", True),  # replacing an older model: not yet swapped
    ("shutil.rmtree", ".part", 1, "before", True),  # swapped, the old model (now in the temp folder) not deleted
])
def test_killed_apply_leaves_the_model_as_before_and_a_rerun_gives_the_same_model(world, tmp_path, monkeypatch,
                                                                                  target, match, nth, when, overwrite):
    run = _run_copy(world, tmp_path)
    if overwrite:  # an older model at RUN/model (the staged one): it stays whole until the new one replaces it
        shutil.copytree(world / "ref" / "staged", run / "model")
    before = _visible(run)
    _kill(tmp_path, ["apply", "run", *APPLY, *(["--overwrite"] if overwrite else [])], target, match, nth, when)
    after = _visible(run)
    if after != before:  # only the new, complete model may have replaced the old one
        assert {k: v for k, v in after.items() if not k.startswith("model/")} == \
            {k: v for k, v in before.items() if not k.startswith("model/")}
        _same_model(run / "model", world / "ref" / "model")
    _complete(run)
    monkeypatch.chdir(tmp_path)
    assert main(["apply", "run", *APPLY, "--overwrite"]) == 0
    _same_model(run / "model", world / "ref" / "model")
    assert not any(p.name.startswith(".model") for p in run.iterdir() if p.name.endswith(".old"))


@pytest.mark.parametrize("target,match,nth,when", [
    ("safetensors.torch.save_file", "model.safetensors", 2, "half"),  # inside step 2's checkpoint
    ("os.replace", "staged.json", 3, "before"),  # step 2's checkpoint saved, staged.json still at step 1
    ("os.replace", "staged.json", 3, "after"),  # between steps 2 and 3
    ("os.replace", "staged.json", -1, "after"),  # staged run complete, RUN/model not saved yet
])
def test_killed_staged_apply_resumes_to_the_same_model(world, tmp_path, monkeypatch, target, match, nth, when):
    run = _run_copy(world, tmp_path)
    if nth == -1:  # the last write of staged.json: count them on the uninterrupted run's history
        nth = 2 + json.loads((world / "ref" / "staged" / "schedule.json").read_text())["data"]["meta"]["staged"]["steps"]
    _kill(tmp_path, ["apply", "run", *STAGED], target, match, nth, when)
    assert not (run / "model").exists()
    _complete(run)
    monkeypatch.chdir(tmp_path)
    assert main(["apply", "run", *STAGED, "--resume"]) == 0
    _same_model(run / "model", world / "ref" / "staged")


_STAMP = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d UTC")


@pytest.mark.parametrize("earlier", [False, True])
def test_killed_report_leaves_the_earlier_report_and_a_rerun_gives_the_same_report(world, tmp_path, monkeypatch,
                                                                                  earlier):
    run = _run_copy(world, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["report", "run"]) == 0
    want = (run / "report.html").read_bytes()
    if not earlier:
        (run / "report.html").unlink()
    before = _visible(run)
    _kill(tmp_path, ["report", "run"], "os.replace", "report.html")
    assert _visible(run) == before  # the earlier report (or none) byte for byte; the temp file is hidden
    assert main(["report", "run"]) == 0
    assert _STAMP.sub(b"", (run / "report.html").read_bytes()) == _STAMP.sub(b"", want)


def test_without_an_atomic_swap_a_leftover_old_folder_does_not_block_the_next_save(tmp_path, monkeypatch):
    """Where renameat2 cannot swap, the old model goes to ``.NAME.old`` first; one left there by a
    process killed between the two renames is cleared, not an error, on the next overwrite."""
    from autocompress.compress import saving

    monkeypatch.setattr(saving, "_exchange", lambda a, b: False)
    model = tiny_model("llama")
    saving.save_compressed(model, None, None, tmp_path / "model")
    want = _logits(tmp_path / "model")
    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "model.safetensors").write_bytes(b"stale")
    saving.save_compressed(model, None, None, tmp_path / "model", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert torch.allclose(_logits(tmp_path / "model"), want, atol=1e-6, rtol=0)
