"""Fuzzed artifacts: whatever a profile.json, schedule.json or space YAML holds, a verb exits 0 or says one line.

A small run is made for real (a tiny Llama profiled and searched in-process); then, from a fixed
seed, hundreds of mutations of its ``profile.json``, its ``schedule.json`` and of space files
(deleted keys, changed types, odd numbers, NaN and infinities, wrapped and unwrapped nesting,
swapped subtrees, truncation, random bytes, hostile YAML) are each fed, in a fresh copy of the
run, to a verb that reads that file, run in-process on the tiny sizes. Every one must end with
exit status 0, or 2 and exactly one line on stderr; never a traceback or another status. The
failures are collected and listed together, each with the mutation that caused it.
"""
from __future__ import annotations

import json
import random
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny import tiny_model

from autocompress.cli import main

SEED = 20260516
SPACE = "name: tiny\ngroup_size: 32\nbits: [4, 16]\ntwo_four: true\nembedding_bits: [8, 16]\n"
BUDGET = ["--budget", "memory=60%"]
SEARCH = ["--trials", "1", "--holdout-tokens", "128", "--window", "64", "--no-progress", "--threads", "1"]
APPLY = ["--data", "text.txt", "--calib-tokens", "128", "--seq-len", "64", "--valid-tokens", "128", "--threads", "1"]
PROFILE = ["--data", "text.txt", "--tokens", "128", "--seq-len", "64", "--no-roles", "--calib-tokens", "128",
           "--calib-seq-len", "64", "--threads", "1"]
CASES = {"profile": 120, "schedule": 110, "space": 90}


# ---------------------------------------------------------------------------------------
# Mutations of parsed documents (JSON or YAML) and of their text


def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    """The path of every node under ``node`` (keys and indexes), the root included."""
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*path, index))
    return found


def _get(node: Any, path: tuple) -> Any:
    for step in path:
        node = node[step]
    return node


def _set(root: Any, path: tuple, value: Any) -> Any:
    """``root`` with the node at ``path`` replaced by ``value`` (the root itself when the path is empty)."""
    if not path:
        return value
    _get(root, path[:-1])[path[-1]] = value
    return root


ODD_NUMBERS = [0, -1, 1, -0.0, 0.5, 1e308, -1e308, 2**63, -(2**63), 10**40, float("nan"), float("inf"),
               float("-inf"), 3, 7, 1e-300]
ODD_VALUES = [None, True, False, "", "x", "model.layers.99", "bits=4", "NaN", 0, 1.5, [], {}, [1, "a"],
              {"bits": 4}, [[[]]], "\u202e\x00"]


def _random_value(rng: random.Random) -> Any:
    return rng.choice(ODD_VALUES + ODD_NUMBERS)


def _mutate_tree(doc: Any, rng: random.Random) -> tuple[Any, str]:
    """One structural mutation of ``doc`` (changed in place where it can be); returns it and what was done."""
    paths = _paths(doc)
    # Free-form ``meta`` objects are read by hand, away from the typed loaders: aim there often.
    free = [p for p in paths if "meta" in p and len(p) - p.index("meta") <= 2]
    path = rng.choice(free if free and rng.random() < 0.4 else paths[1:] or paths)
    node = _get(doc, path)
    kind = rng.choice(["delete", "retype", "number", "wrap", "unwrap", "empty", "rename", "add", "swap", "grow"])
    where = "/".join(map(str, path)) or "<root>"
    if kind == "number":
        numeric = [p for p in paths if isinstance(_get(doc, p), (int, float)) and not isinstance(_get(doc, p), bool)]
        if numeric:
            path = rng.choice(numeric)
            value = rng.choice(ODD_NUMBERS)
            return _set(doc, path, value), f"number {'/'.join(map(str, path))} = {value!r}"
        kind = "retype"
    if kind == "delete" and path:
        parent = _get(doc, path[:-1])
        del parent[path[-1]]
        return doc, f"delete {where}"
    if kind == "wrap":
        value = [node] if rng.random() < 0.5 else {"value": node}
        return _set(doc, path, value), f"wrap {where} in {type(value).__name__}"
    if kind == "unwrap" and isinstance(node, (dict, list)) and node:
        inner = next(iter(node.values())) if isinstance(node, dict) else node[0]
        return _set(doc, path, inner), f"unwrap {where}"
    if kind == "empty" and isinstance(node, (dict, list)):
        return _set(doc, path, type(node)()), f"empty {where}"
    if kind == "rename" and path and isinstance(_get(doc, path[:-1]), dict):
        parent = _get(doc, path[:-1])
        new = rng.choice(["", path[-1] + "_", str(path[-1]).upper(), "model.layers.99", "bits=5"])
        parent[new] = parent.pop(path[-1])
        return doc, f"rename {where} -> {new!r}"
    if kind == "add" and isinstance(node, dict):
        key = rng.choice(["extra", "units", "bits", "", "model.layers.7", "embed:bits=8"])
        node[key] = _random_value(rng)
        return doc, f"add {where}/{key!r}"
    if kind == "swap":
        other = rng.choice(paths)
        value = json.loads(json.dumps(_get(doc, other)))
        return _set(doc, path, value), f"swap {where} <- {'/'.join(map(str, other)) or '<root>'}"
    if kind == "grow" and isinstance(node, list) and node:
        node.append(json.loads(json.dumps(rng.choice(node))))
        return doc, f"duplicate an item of {where}"
    value = _random_value(rng)
    return _set(doc, path, value), f"retype {where} = {value!r:.40}"


def _mutate_text(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One byte-level mutation: truncation, flipped or inserted random bytes, or a random file."""
    kind = rng.choice(["truncate", "flip", "insert", "random", "empty", "bom"])
    if kind == "truncate":
        cut = rng.randrange(len(data))
        return data[:cut], f"truncate at {cut}"
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out), "flip bytes"
    if kind == "insert":
        at = rng.randrange(len(data))
        return data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:], f"insert random bytes at {at}"
    if kind == "random":
        return rng.randbytes(rng.randint(1, 300)), "random bytes"
    if kind == "empty":
        return b"", "empty file"
    return b"\xef\xbb\xbf" + data, "byte-order mark"


# The free-form ``meta`` keys a verb reads by hand, each given the wrong shape before the random
# cases start (and fed to every verb that reads the artifact): the loaders must check them.
DIRECTED = {"profile": [("calibration", v) for v in (0.5, "x", [], {"fingerprint": 5})],
            "schedule": [(k, v) for k in ("model", "data", "source_model", "source_profile", "source_signature",
                                          "agnostic") for v in (5, [])]}


def _directed(text: str, key: str, value: Any) -> tuple[bytes, str]:
    doc = json.loads(text)
    doc["data"]["meta"][key] = value
    return json.dumps(doc).encode(), f"meta.{key} = {value!r}"


def _mutate_json(text: str, rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.2:
        return _mutate_text(text.encode(), rng)
    doc, what = json.loads(text), []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        doc, step = _mutate_tree(doc, rng)
        what.append(step)
    return json.dumps(doc).encode(), "; ".join(what)


HOSTILE_YAML = [
    ("python object tag", "name: x\nbits: !!python/object/apply:os.system ['echo owned']\n"),
    ("python name tag", "name: !!python/name:os.system\nbits: [4, 16]\n"),
    ("recursive alias", "name: x\nbits: &a [4, *a]\n"),
    ("alias bomb", "a: &a [1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                   "c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nname: x\nbits: [4, 16]\n"),
    ("duplicate keys", "name: x\nbits: [4, 16]\nbits: [3]\n"),
    ("tabs", "name: x\n\tbits: [4, 16]\n"),
    ("a list document", "- name: x\n- bits: [4]\n"),
    ("a scalar document", "42\n"),
    ("two documents", "name: x\nbits: [4, 16]\n---\nname: y\n"),
    ("binary tag", "name: !!binary aGVsbG8=\nbits: [4, 16]\n"),
    ("timestamp", "name: 2001-12-14t21:59:43.10-05:00\nbits: [4, 16]\n"),
    ("huge int", f"name: x\nbits: [{10 ** 400}, 16]\n"),
    ("set", "name: x\nbits: !!set {4: null, 16: null}\n"),
    ("non-string name", "name: [1, 2]\nbits: [4, 16]\n"),
    ("frozen bad regex", "name: x\nbits: [4, 16]\nfrozen: ['re:(']\n"),
    ("tie unknown role", "name: x\ngranularity: linear\nbits: [4, 16]\ntie: [[q, nonsense]]\n"),
]


def _mutate_yaml(text: str, rng: random.Random, index: int) -> tuple[bytes, str]:
    if index < len(HOSTILE_YAML):
        what, hostile = HOSTILE_YAML[index]
        return hostile.encode(), what
    if rng.random() < 0.2:
        return _mutate_text(text.encode(), rng)
    doc, what = yaml.safe_load(text), []
    for _ in range(rng.choice([1, 1, 2])):
        doc, step = _mutate_tree(doc, rng)
        what.append(step)
    return yaml.safe_dump(doc, allow_unicode=True).encode(), "; ".join(what)


# ---------------------------------------------------------------------------------------
# The run every case starts from


@pytest.fixture(scope="module")
def template(tmp_path_factory, tokenizer) -> Path:
    """model/ (a tiny Llama), target/ (a tiny Qwen2), text.txt, space.yaml and run/ profiled and searched."""
    root = tmp_path_factory.mktemp("fuzz")
    for name, family in (("model", "llama"), ("target", "qwen2")):
        tiny_model(family).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "text.txt").write_text("\n\n".join(f"Paragraph {i} tells how the function returns a value. " * 5
                                               for i in range(40)))
    (root / "space.yaml").write_text(SPACE)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert main(["profile", "model", "--out", "run", "--space", "space.yaml", *PROFILE]) == 0
        assert main(["search", "run", *BUDGET, "--space", "space.yaml", "--storage", "run/study.journal",
                     *SEARCH]) == 0
    for name in ("study.journal", "search.json"):
        (root / "run" / name).unlink()
    return root


@dataclass
class Outcome:
    status: int | None
    err: str
    crash: str | None  # the last line of an exception that escaped main()


def _run(argv: list[str], capsys) -> Outcome:
    capsys.readouterr()
    crash = None
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's errors
        status = exc.code
    except Exception:  # noqa: BLE001 (any escape is what the fuzz is looking for)
        status, crash = None, traceback.format_exc().strip().splitlines()[-1]
    out, err = capsys.readouterr()
    return Outcome(status, err + ("Traceback" if "Traceback" in out else ""), crash)


def _verdict(outcome: Outcome) -> str | None:
    """Why ``outcome`` breaks the rule (exit 0, or 2 with one line on stderr), or None."""
    if outcome.crash is not None:
        return f"crashed: {outcome.crash}"
    if "Traceback" in outcome.err:
        return "printed a traceback"
    if outcome.status == 0:
        return None
    lines = outcome.err.strip().splitlines()
    if outcome.status != 2:
        return f"exit status {outcome.status}: {outcome.err.strip()[-200:]}"
    if len(lines) != 1 or not lines[0].startswith("autocompress"):
        return f"not one line: {outcome.err.strip()[-300:]!r}"
    return None


Verb = Callable[[Path], list[str]]
VERBS: dict[str, list[Verb]] = {  # who reads each artifact; case i uses verb i % len
    "profile": [lambda case: ["search", str(case), *BUDGET, "--space", "space.yaml", "--storage",
                              str(case / "study.journal"), *SEARCH],
                lambda case: ["apply", str(case), *APPLY[2:]],  # the data named by the profile
                lambda case: ["report", str(case)]],
    "schedule": [lambda case: ["apply", str(case), *APPLY[2:]],  # the data named by the schedule's meta
                 lambda case: ["transfer", str(case), "target", *BUDGET, "--signature-tokens", "0",
                               "--check-tokens", "0", "--out", str(case / "moved"), "--threads", "1"],
                 lambda case: ["report", str(case)]],
    "space": [lambda case: ["search", str(case), *BUDGET, "--space", str(case / "space.yaml"), "--storage",
                            str(case / "study.journal"), *SEARCH],
              lambda case: ["search", str(case), *BUDGET, "--space", str(case / "space.yaml"), "--storage",
                            str(case / "study.journal"), *SEARCH],
              lambda case: ["profile", "model", "--out", str(case / "again"), "--space", str(case / "space.yaml"),
                            "--no-proxies", *PROFILE]],
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("artifact", list(CASES))
def test_fuzzed_artifacts_give_exit_0_or_one_line(artifact, template, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(template)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "200")
    rng = random.Random(f"{SEED}:{artifact}")
    name = {"profile": "profile.json", "schedule": "schedule.json", "space": "space.yaml"}[artifact]
    original = (template / ("space.yaml" if artifact == "space" else f"run/{name}")).read_text()
    directed = DIRECTED.get(artifact, [])
    failures, statuses = [], {}
    for index in range(len(directed) + CASES[artifact]):
        if index < len(directed):
            payload, what = _directed(original, *directed[index])
            verbs = VERBS[artifact]
        else:
            mutate = _mutate_yaml if artifact == "space" else _mutate_json
            payload, what = mutate(original, rng, index) if artifact == "space" else mutate(original, rng)
            verbs = [VERBS[artifact][index % len(VERBS[artifact])]]
        for verb in verbs:
            case = tmp_path / f"case{index}"
            shutil.copytree(template / "run", case)
            (case / name).write_bytes(payload)
            argv = verb(case)
            outcome = _run(argv, capsys)
            statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
            if (problem := _verdict(outcome)) is not None:
                failures.append(f"case {index} ({what}) via `{argv[0]}`: {problem}")
            shutil.rmtree(case)
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)
    assert statuses.get(0, 0) > 0 and statuses.get(2, 0) > 0, statuses  # both outcomes were reached
