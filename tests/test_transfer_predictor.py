"""Sensitivity predictor: learns from profiles, saves as JSON (no pickle), ranks an unseen model's units."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from autocompress.compress.tiny_models import tiny_model
from autocompress.errors import UserError
from autocompress.profile.artifact import Profile, UnitProfile
from autocompress.transfer.predictor import SensitivityPredictor, predicted_kl, select_units_to_measure
from space_helpers import rtn_space, space_file

LABELS = {"bits=2": 2, "bits=3": 3, "bits=4": 4}


def _profile(name: str, blocks: int, seed: int) -> Profile:
    """A profile whose KL follows a law the predictor can learn: sensitive ends, x4 per bit,
    and a proxy ("fisher") that tracks the sensitivity with noise."""
    rng = np.random.default_rng(seed)
    space = rtn_space("rtn-quant-only")
    units = []
    for i in range(blocks):
        depth = i / (blocks - 1)
        sensitivity = 1 + 6 * math.exp(-8 * depth) + 3 * math.exp(-8 * (1 - depth)) + rng.uniform(0, 0.5)
        kl = {label: 0.01 * sensitivity * 4.0 ** (4 - bits) * rng.uniform(0.9, 1.1) for label, bits in LABELS.items()}
        units.append(UnitProfile(f"model.layers.{i}", i, parameters=1000, kl=kl,
                                 proxies={"fisher": sensitivity * rng.uniform(0.8, 1.2), "noise": rng.normal()}))
    return Profile(name, f"fp-{name}", "d", "dfp", "quant-only", "sfp", "block", 1024, 3.0,
                   {label: space.quant_choice(bits).to_json() for label, bits in LABELS.items()}, units)


def test_predictor_ranks_an_unseen_model_and_round_trips_json(tmp_path):
    predictor = SensitivityPredictor.from_profiles([_profile("a", 8, 0), _profile("b", 12, 1)], trees=60)
    held_out = _profile("c", 10, 2)
    rho = predictor.spearman(held_out)
    assert rho["overall"] > 0.9  # bits dominate the ranking
    assert rho["within_label"] > 0.6  # and within one bit width the depth/proxy law carries over
    path = predictor.save(tmp_path / "predictor.json")
    text = path.read_text()
    assert json.loads(text)["type"] == "sensitivity-predictor"
    loaded = SensitivityPredictor.load(path)
    assert loaded.spearman(held_out) == pytest.approx(rho)
    assert loaded.sources == ["a", "b"]


def test_predictor_file_is_checked_strictly(tmp_path):
    path = SensitivityPredictor.from_profiles([_profile("a", 6, 0)], trees=5).save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    data["data"]["targets"] = data["data"]["targets"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="one target number each"):
        SensitivityPredictor.load(tmp_path / "bad.json")
    data["data"]["extra"] = 1
    (tmp_path / "bad2.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="needs exactly"):
        SensitivityPredictor.load(tmp_path / "bad2.json")


def test_select_units_to_measure_and_predict_the_rest():
    predictor = SensitivityPredictor.from_profiles([_profile("a", 8, 0), _profile("b", 12, 1)], trees=40)
    model = tiny_model("qwen2", layers=6)
    probes = [(label, rtn_space("rtn-quant-only").quant_choice(bits)) for label, bits in LABELS.items()]
    chosen = select_units_to_measure(predictor, model, probes, fraction=0.5)
    assert len(chosen) == 3 and len(set(chosen)) == 3
    assert {"model.layers.0", "model.layers.5"} <= set(chosen)
    rest = [f"model.layers.{i}" for i in range(6) if f"model.layers.{i}" not in chosen]
    predicted = predicted_kl(predictor, model, probes, rest, scale=0.02)
    for unit in rest:
        assert predicted[unit]["bits=2"] > predicted[unit]["bits=3"] > predicted[unit]["bits=4"] > 0


def test_profile_predict_measures_only_uncertain_units(tmp_path, tokenizer, capsys):
    from tiny import tiny_model as tests_tiny_model

    from autocompress.cli import main

    model_dir = tmp_path / "tiny"
    tests_tiny_model("llama").save_pretrained(model_dir)  # 3 blocks
    tokenizer.save_pretrained(model_dir)
    predictor_path = SensitivityPredictor.from_profiles([_profile("a", 8, 0)], trees=20).save(tmp_path / "p.json")
    run = tmp_path / "run"
    argv = ["profile", str(model_dir), "--space", space_file(tmp_path, "rtn-quant-only"), "--out", str(run), "--predict", str(predictor_path),
            "--measure-fraction", "0.5", "--tokens", "256", "--seq-len", "64", "--no-roles", "--no-proxies",
            "--threads", "1"]
    assert main(argv) == 0
    assert "predicted 1" in capsys.readouterr().out
    profile = Profile.load(run / "profile.json")
    assert profile.meta["measured_units"] == ["model.layers.0", "model.layers.2"]
    assert profile.meta["predicted_units"] == ["model.layers.1"]
    assert [u.name for u in profile.units] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    guess = profile.unit("model.layers.1").kl
    assert set(guess) == {"bits=2", "bits=3", "bits=4", "bits=8"}
    # trained on bits 2-4 only: a forest does not extrapolate to 8 bits, it stays flat
    assert guess["bits=2"] > guess["bits=3"] > guess["bits=4"] >= guess["bits=8"] > 0
    measured = profile.unit("model.layers.0").kl
    assert measured["bits=2"] > measured["bits=4"] > 0
    assert main(argv) == 2  # exists: refuses without --force
    assert "--force" in capsys.readouterr().err
