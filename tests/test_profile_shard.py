"""Sharded profiling: shards measured apart and merged give the single run's profile.json;
merges of shards that do not belong together are refused with one line."""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
from tiny import tiny_model

from autocompress.cli import main
from autocompress.errors import UserError
from autocompress.profile import Profile
from autocompress.profile.artifact import PARTIAL_FILE, PartialProfile
from autocompress.profile.run import ProfileSettings, profile_run
from autocompress.profile.shard import Shard, merge_profiles, profile_shard
from autocompress.run_calibration import CALIBRATION_FILE, CalibrationSet, load_calibration
from autocompress.search.space import space_from_dict

# GPTQ act-order (statistics and codes per block), a structural choice, the embedding and an untied head.
SPACE = {"name": "shard", "bits": [4, 16], "group_size": 32, "method": "gptq", "act_order": True,
         "embedding_bits": [4, 16], "drop": True}
# Roles and proxies on: the merge must put them together as one run does; curated rows chosen per shard.
SETTINGS = ProfileSettings(tokens=128, seq_len=64, role_tokens=512, progress=False, calib_tokens=256,
                           calib_seq_len=64, calibration="curated")
FAST = ProfileSettings(tokens=128, seq_len=64, roles=False, proxies=False, progress=False, calib_tokens=128,
                       calib_seq_len=64, calibration="first")
TIMING = ("seconds", "timings", "cpu_timings", "cpu_seconds", "threads")  # how long, on what: not what


def _space(**changes):
    return space_from_dict({**SPACE, **changes}, "test")


def _comparable(path: Path) -> dict:
    """profile.json's data without the timings, the additivity check and the shards' note."""
    data = json.loads(path.read_text())["data"]
    for key in ("seconds", "additivity"):
        data.pop(key)
    for key in (*TIMING, "shards"):
        data["meta"].pop(key, None)
    data["meta"].get("roles", {}).pop("seconds", None)
    return data


def _assert_same(got, want, where="profile"):
    """Equal, floats within 1e-6 (the merge copies the shards' numbers, so they are in fact equal)."""
    if isinstance(want, float) and isinstance(got, float):
        assert got == pytest.approx(want, abs=1e-6) or (math.isnan(got) and math.isnan(want)), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for key in want:
            _assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == want, where


def _assert_merge_equals_single(merged: Path, single: Path) -> None:
    got, want = _comparable(merged / "profile.json"), _comparable(single / "profile.json")
    assert [u["name"] for u in got["units"]] == [u["name"] for u in want["units"]]
    for mine, theirs in zip(got.pop("units"), want.pop("units")):  # unit by unit, field by field
        _assert_same(mine, theirs, mine["name"])
    _assert_same(got, want)
    assert load_calibration(merged).fingerprint == load_calibration(single).fingerprint


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here (restored after): on a busy 2-core machine two threads made these
    tests about 9x slower, and the profiles compared are the same either way."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("shard") / "model"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def split(model_dir) -> Path:
    """root/single (one run), root/s0 and root/s1 (shards 0/2 and 1/2), all with SPACE and SETTINGS."""
    root = model_dir.parent
    profile_run(str(model_dir), root / "single", space=_space(), settings=SETTINGS)
    for k in range(2):
        profile_shard(str(model_dir), root / f"s{k}", f"{k}/2", space=_space(), settings=SETTINGS)
    return root


def test_two_shards_merged_equal_one_run(split, tmp_path):
    s0, s1 = PartialProfile.load(split / "s0" / PARTIAL_FILE), PartialProfile.load(split / "s1" / PARTIAL_FILE)
    assert (s0.shard, s0.shards, s1.shard, s1.shards) == (0, 2, 1, 2)
    assert s0.measured == ["model.layers.0", "model.layers.2"] and s1.measured == ["model.layers.1"]
    assert s0.unit_names == s1.unit_names == [f"model.layers.{i}" for i in range(3)]
    assert [u.name for u in s0.profile.extra_units] == ["model.embed_tokens", "lm_head"]
    assert not s1.profile.extra_units and not s1.profile.role_curves  # once per model: shard 0
    assert s0.fingerprints == s1.fingerprints  # curated rows chosen alike by both shards
    assert not (split / "s0" / "profile.units").exists()  # checkpoints cleared once the partial is written

    merged = merge_profiles([split / "s1", split / "s0"], tmp_path)  # any order
    _assert_merge_equals_single(tmp_path, split / "single")
    assert merged.unit("model.layers.1").roles and merged.unit("model.layers.1").dominant_role
    assert merged.proxy_spearman and merged.additivity == []
    assert "additivity" in merged.meta["shards"]["additivity"] and merged.meta["shards"]["count"] == 2
    assert Profile.load(tmp_path / "profile.json").to_json() == merged.to_json()
    # the GPTQ codes of every block, for the search and apply
    assert sorted(p.name for p in (tmp_path / "codes").iterdir()) == \
        sorted(p.name for p in (split / "single" / "codes").iterdir())
    # merging again into the same place is fine; into one of the shards' folders too
    merge_profiles([split / "s0", split / "s1"], tmp_path)
    shutil.copytree(split / "s0", tmp_path / "into")
    merge_profiles([tmp_path / "into", split / "s1"], tmp_path / "into")
    _assert_merge_equals_single(tmp_path / "into", split / "single")


def test_three_shards_of_linear_units_keep_each_block_in_one_shard(model_dir, tmp_path):
    space = _space(bits=[3, 16], embedding_bits=[], drop=False, granularity="linear", method="rtn",
                   act_order=False)
    profile_run(str(model_dir), tmp_path / "single", space=space, settings=FAST)
    parts = []
    for k in range(3):
        outcome = profile_shard(str(model_dir), tmp_path / f"s{k}", Shard(k, 3), space=space, settings=FAST)
        assert {name.split(".")[2] for name in outcome.partial.measured} == {str(k)}  # all 7 linears of block k
        assert len(outcome.partial.measured) == 7
        parts.append(tmp_path / f"s{k}")
    merge_profiles(parts, tmp_path / "merged")
    _assert_merge_equals_single(tmp_path / "merged", tmp_path / "single")


def test_cli_shards_then_merge(model_dir, split, tmp_path, capsys):
    (tmp_path / "space.yaml").write_text(json.dumps(SPACE))
    common = ["--space", str(tmp_path / "space.yaml"), "--tokens", "128", "--seq-len", "64", "--role-tokens", "512",
              "--calib-tokens", "256", "--calib-seq-len", "64"]
    for k in range(2):
        assert main(["profile", str(model_dir), "--out", str(tmp_path / f"r{k}"), "--shard", f"{k}/2", *common]) == 0
        assert f"shard {k}/2" in capsys.readouterr().out
    assert main(["profile", str(model_dir), "--out", str(tmp_path / "r1"), "--shard", "1/2", *common]) == 0
    assert "reused" in capsys.readouterr().out
    assert main(["profile", "--merge", str(tmp_path / "r0"), str(tmp_path / "r1"), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "merged 2 shards" in out and "most and least sensitive units" in out
    want = _comparable(split / "single" / "profile.json")["units"]
    assert _comparable(tmp_path / "run" / "profile.json")["units"] == want


def test_a_killed_shard_resumes_with_the_units_it_finished(model_dir, split, tmp_path, monkeypatch):
    from autocompress.profile import run as profile_module

    original, seen = profile_module._measure_unit, []

    def stop_after_one(*args, **kwargs):
        seen.append(args[2].name)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(profile_module, "_measure_unit", stop_after_one)
        with pytest.raises(KeyboardInterrupt):
            profile_shard(str(model_dir), tmp_path, "0/2", space=_space(), settings=SETTINGS)
    assert not (tmp_path / PARTIAL_FILE).exists()
    assert (tmp_path / "profile.units" / "model.layers.0.json").exists()
    seen.clear()
    monkeypatch.setattr(profile_module, "_measure_unit", lambda *a, **k: seen.append(a[2].name) or original(*a, **k))
    profile_shard(str(model_dir), tmp_path, "0/2", space=_space(), settings=SETTINGS)
    assert seen == ["model.layers.2"]  # block 0 came from its checkpoint
    _assert_same(_comparable_partial(tmp_path), _comparable_partial(split / "s0"))


def _comparable_partial(run: Path) -> dict:
    data = json.loads((run / PARTIAL_FILE).read_text())["data"]
    profile = data["profile"]
    profile.pop("seconds")
    for key in TIMING:
        profile["meta"].pop(key, None)
    profile["meta"].get("roles", {}).pop("seconds", None)
    return data


def test_a_shard_is_reused_or_refused_like_a_profile(model_dir, split):
    again = profile_shard(str(model_dir), split / "s1", "1/2", space=_space(), settings=SETTINGS)
    assert again.reused
    with pytest.raises(UserError, match=r"is shard 1/2, not 0/2; pass --force"):
        profile_shard(str(model_dir), split / "s1", "0/2", space=_space(), settings=SETTINGS)
    with pytest.raises(UserError, match=r"another search space .*--force"):
        profile_shard(str(model_dir), split / "s1", "1/2", space=_space(bits=[3, 16]), settings=SETTINGS)
    for bad in ("2/2", "1", "a/2", "-1/2"):
        with pytest.raises(UserError, match="expected K/N"):
            Shard.parse(bad)
    with pytest.raises(UserError, match="units in only 3 blocks; use at most 3 shards"):
        profile_shard(str(model_dir), split / "x", "0/4", space=_space(), settings=SETTINGS)
    assert not (split / "x").exists()  # refused before anything was written


def test_calibration_from_another_shard(model_dir, split, tmp_path):
    outcome = profile_shard(str(model_dir), tmp_path / "s1", "1/2", space=_space(), settings=SETTINGS,
                            calibration_from=split / "s0")
    assert outcome.partial.fingerprints == PartialProfile.load(split / "s0" / PARTIAL_FILE).fingerprints
    with pytest.raises(UserError, match="no calibration.safetensors there"):
        profile_shard(str(model_dir), tmp_path / "s2", "1/2", space=_space(), settings=SETTINGS,
                      calibration_from=tmp_path / "nowhere")
    with pytest.raises(UserError, match="are not what --calib-tokens"):
        profile_shard(str(model_dir), tmp_path / "s3", "1/2", space=_space(), settings=FAST,
                      calibration_from=split / "s0")


@pytest.fixture(scope="module")
def strays(model_dir, split) -> Path:
    """Shards that do not belong to split's: another space, another split, other calibration rows."""
    import autocompress.profile.shard as shard_module

    root = split
    profile_shard(str(model_dir), root / "space1", "1/2", space=_space(bits=[3, 16]), settings=SETTINGS)
    profile_shard(str(model_dir), root / "of3", "1/3", space=_space(), settings=SETTINGS)
    shutil.copytree(root / "s1", root / "s1copy")
    with pytest.MonkeyPatch.context() as patch:  # as if chosen on a machine that broke a tie the other way
        original = shard_module.choose_calibration
        patch.setattr(shard_module, "choose_calibration",
                      lambda *a: CalibrationSet(original(*a).rows.flip(0), "curated", 0))
        profile_shard(str(model_dir), root / "rows1", "1/2", space=_space(), settings=SETTINGS)
    (root / "empty").mkdir()
    return root


@pytest.mark.parametrize("runs, message", [
    (["s0"], "shard 1/2 is missing (given: 0/2); add its folder to --merge"),
    (["s0", "s1", "s1copy"], "shard 1/2 is given twice"),
    (["s0", "space1"], "was profiled with another search space than"),
    (["s0", "of3"], "is shard 1/3 but"),
    (["s0", "rows1"], "was profiled with another set of calibration rows than"),
    (["s0", "empty"], "holds no profile.partial.json"),
])
def test_merge_refusals_are_one_line(strays, tmp_path, capsys, runs, message):
    status = main(["profile", "--merge", *[str(strays / r) for r in runs], "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "profile.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["m", "--merge", "a", "b"], "not both"),
    ([], "MODEL is missing"),
    (["m", "--calibration-from", "a"], "--calibration-from works with --shard"),
    (["m", "--shard", "0/2", "--predict", "p.json"], "do not combine"),
    (["m", "--shard", "2/2"], "expected K/N"),
])
def test_cli_bad_shard_options_are_one_line(tmp_path, capsys, argv, message):
    status = main(["profile", *argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1


def test_merge_refuses_a_profile_of_other_inputs_unless_forced(split, tmp_path):
    shutil.copytree(split / "single", tmp_path / "run")
    profile = Profile.load(tmp_path / "run" / "profile.json")
    profile.space_fingerprint = "0" * 16
    profile.save(tmp_path / "run" / "profile.json")
    with pytest.raises(UserError, match="another search space.*--force"):
        merge_profiles([split / "s0", split / "s1"], tmp_path / "run")
    merge_profiles([split / "s0", split / "s1"], tmp_path / "run", force=True)
    _assert_merge_equals_single(tmp_path / "run", split / "single")


def test_a_damaged_partial_is_refused(split, tmp_path):
    shutil.copytree(split / "s1", tmp_path / "s1")
    path = tmp_path / "s1" / PARTIAL_FILE
    data = json.loads(path.read_text())
    data["data"]["measured"] = ["model.layers.0"]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="measured differs from the profile's units"):
        merge_profiles([split / "s0", tmp_path / "s1"], tmp_path / "run")
    assert not (tmp_path / "run" / CALIBRATION_FILE).exists()  # refused before anything was written


@pytest.mark.real
def test_smollm2_in_two_shards_equals_one_run(tmp_path):
    space = space_from_dict({"name": "real", "bits": [4, 16], "group_size": 32, "method": "rtn",
                             "act_order": False}, "test")
    settings = ProfileSettings(tokens=128, seq_len=64, roles=False, proxies=False, progress=False,
                               calib_tokens=128, calib_seq_len=64, calibration="first")
    started = time.perf_counter()
    profile_run("smollm2-135m", tmp_path / "single", space=space, settings=settings)
    for k in range(2):
        profile_shard("smollm2-135m", tmp_path / f"s{k}", f"{k}/2", space=space, settings=settings)
    merged = merge_profiles([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    assert len(merged.units) == 30
    _assert_merge_equals_single(tmp_path / "merged", tmp_path / "single")
    print(f"SmolLM2 single run + 2 shards + merge: {time.perf_counter() - started:.0f} s")
