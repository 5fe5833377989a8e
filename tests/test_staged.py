"""Staged compression: step planning, gates with exact rollback, resume, the apply verb."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from autocompress.cli import main
from autocompress.compress.apply import DroppedBlock
from autocompress.compress.distill import DistillConfig
from autocompress.compress.memory import MemoryModel
from autocompress.compress.quantize import QuantLinear
from autocompress.compress.saving import load_compressed
from autocompress.compress.staged import (Gates, Quality, Recovery, StagedConfig, StageUnit, next_step,
                                          stage_units, staged_apply)
from autocompress.compress.storage import round_to_storage
from autocompress.compress.tiny_models import random_tokens, tiny_model
from autocompress.errors import UserError
from autocompress.models import model_fingerprint
from autocompress.profile.artifact import Profile, UnitProfile
from autocompress.schedule import Choice, PruneScore, Schedule

CALIB = random_tokens(256, 8, 64).reshape(-1)
VALID = random_tokens(256, 4, 64, seed=1).reshape(-1)


def _config(**kwargs) -> StagedConfig:
    base = dict(step_fraction=0.01, gates=Gates(step_ppl_increase=None), recovery=Recovery.NEVER,
                distill=DistillConfig(steps=3, batch_size=2, seq_len=32, lora_rank=2), calib_seq_len=64,
                eval_window=64, progress=False)
    base.update(kwargs)
    return StagedConfig(**base)


def _profile(model, order: list[int]) -> Profile:
    """A profile whose KLs put the blocks in ``order`` (most robust first)."""
    units = [UnitProfile(name=f"model.layers.{i}", block=i, kl={"bits=2": 0.1 * rank, "bits=8": 0.1 * rank,
                                                                  "channels=0.5": 0.1 * rank, "drop": 0.1 * rank})
             for rank, i in enumerate(order)]
    return Profile(model="tiny", model_fingerprint=model_fingerprint(model), data="d", data_fingerprint="d",
                   space="s", space_fingerprint="s", granularity="block", calibration_tokens=0, base_loss=0.0,
                   choices={}, units=units)


def test_steps_remove_at_most_the_fraction_and_at_least_one_unit():
    units = [StageUnit(f"u{i}", i, {}) for i in range(5)]
    weights = {"u0": 10.0, "u1": 10.0, "u2": 30.0, "u3": 5.0, "u4": 5.0}
    assert [u.name for u in next_step(units, weights, 100, 0.25)] == ["u0", "u1"]
    assert [u.name for u in next_step(units[2:], weights, 100, 0.25)] == ["u2"]  # alone over the cap
    assert [u.name for u in next_step(units, weights, 100, 1.0)] == [u.name for u in units]


def test_gates_name_each_failure():
    gates = Gates(step_kl=0.1, step_ppl_increase=0.2, total_kl=0.3, total_ppl_increase=0.5)
    original, before = Quality(10.0, 2.3, 0.0), Quality(12.0, 2.5, 0.2)
    assert gates.failures(before, Quality(13.0, 2.56, 0.25), original) == []
    failed = gates.failures(before, Quality(16.0, 2.77, 0.35), original)
    assert len(failed) == 4 and failed[0].startswith("step KL")


def test_gate_failure_rolls_back_exactly_one_step(tmp_path):
    model = tiny_model("llama", layers=4)
    original = copy.deepcopy(model)
    fp = model_fingerprint(model)
    # Block 1 at 2 bits per channel wrecks a random model; 8 bits barely changes it.
    units = {f"model.layers.{i}": Choice(bits=8, group_size=32) for i in (0, 2, 3)}
    units["model.layers.1"] = Choice(bits=2, group_size=None)
    schedule = Schedule(fp, units)
    config = _config(gates=Gates(step_kl=0.002, step_ppl_increase=None))  # 2-bit: ~0.012, 8-bit: ~1e-5
    result = staged_apply(model, schedule, CALIB, VALID, config, tmp_path, profile=_profile(model, [1, 0, 2, 3]),
                          fingerprint=fp)

    gates = [s.gate for s in result.steps]
    assert gates == ["rolled back", "passed", "passed", "passed"], [s.failures for s in result.steps]
    assert result.steps[0].units == ["model.layers.1"] and result.frozen == ["model.layers.1"]
    assert "model.layers.1" not in result.schedule.units
    blocks = result.model.model.layers
    expected = round_to_storage(copy.deepcopy(original.model.layers[1])).state_dict()
    got = blocks[1].state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    for i in (0, 2, 3):  # the later steps were still applied
        assert isinstance(blocks[i].self_attn.q_proj, QuantLinear) and blocks[i].self_attn.q_proj.bits == 8
    assert result.steps[1].before == result.steps[0].before  # quality restored with the weights
    size = MemoryModel.from_model(original).schedule_bytes(result.schedule)
    assert result.final_bytes == size == result.steps[-1].bytes_after


def _resume_schedule(model) -> Schedule:
    return Schedule(model_fingerprint(model), {
        "model.layers.0": Choice(bits=4, group_size=32),
        "model.layers.1": Choice(channel_ratio=0.5, score=PruneScore.WANDA),
        "model.layers.2": Choice(drop=True),
        "model.layers.3": Choice(bits=3, group_size=32, head_ratio=0.5),
    })


def test_interrupted_run_resumes_from_the_last_completed_step(tmp_path):
    config = _config(recovery=Recovery.ALWAYS)
    profile_order = [2, 0, 1, 3]  # the dropped block first, so the checkpoint must handle it
    reference = tiny_model("llama", layers=4)
    full = staged_apply(reference, _resume_schedule(reference), CALIB, VALID, config, tmp_path / "full",
                        profile=_profile(reference, profile_order))
    assert len(full.steps) == 4

    class Interrupt(Exception):
        pass

    def stop_after_two(record):
        if record.index == 2:
            raise Interrupt

    model = tiny_model("llama", layers=4)
    with pytest.raises(Interrupt):
        staged_apply(model, _resume_schedule(model), CALIB, VALID, config, tmp_path / "run",
                     profile=_profile(model, profile_order), on_step=stop_after_two)
    checkpoint, _ = load_compressed(tmp_path / "run" / "staged" / "model")
    assert len(checkpoint.model.layers) == 3  # the dropped block is really gone on disk

    fresh = tiny_model("llama", layers=4)
    with pytest.raises(UserError, match="--resume"):
        staged_apply(fresh, _resume_schedule(fresh), CALIB, VALID, config, tmp_path / "run")
    seen = []
    resumed = staged_apply(fresh, _resume_schedule(fresh), CALIB, VALID, replace_resume(config), tmp_path / "run",
                           profile=_profile(fresh, profile_order), on_step=lambda r: seen.append(r.index))
    assert seen == [3, 4]  # steps 1 and 2 were not redone
    assert [s.units for s in resumed.steps] == [s.units for s in full.steps]
    want, got = full.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(want[key].float(), got[key].float(), atol=1e-6), key
    assert len(resumed.model.model.layers) == 3 and not any(isinstance(b, DroppedBlock)
                                                           for b in resumed.model.model.layers)


def replace_resume(config: StagedConfig) -> StagedConfig:
    from dataclasses import replace

    return replace(config, resume=True)


def test_stage_units_group_linear_overrides_with_their_block():
    model = tiny_model("llama", layers=3)
    schedule = Schedule(model_fingerprint(model), {
        "model.layers.1": Choice(bits=4), "model.layers.1.mlp.down_proj": Choice(bits=8),
        "model.layers.2": Choice(), "lm_head": Choice(bits=8)})
    units = stage_units(model, schedule)
    assert [u.name for u in units] == ["model.layers.1", "lm_head"]
    assert set(units[0].entries) == {"model.layers.1", "model.layers.1.mlp.down_proj"}


def _write_run(tmp_path, model, units: dict, meta: dict | None = None):
    run = tmp_path / "run"
    run.mkdir()
    Schedule(model_fingerprint(model), units, meta or {}).save(run / "schedule.json")
    return run


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["apply", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run directory not found" in err[0]

    model = tiny_model("llama", layers=2)
    run = _write_run(tmp_path, model, {"model.layers.0": Choice(bits=4)})
    assert main(["apply", str(run)]) == 2  # no model named anywhere
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0]

    with pytest.raises(SystemExit) as exit_info:
        main(["apply", str(run), "--step-fraction", "1.5"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_rollback_after_failed_recovery_restores_every_trained_block(tmp_path):
    model = tiny_model("llama", layers=3)
    expected = round_to_storage(copy.deepcopy(model)).state_dict()
    schedule = Schedule(model_fingerprint(model), {"model.layers.0": Choice(channel_ratio=0.5),
                                                   "model.layers.2": Choice(bits=4, group_size=32)})
    # An impossible gate: every step fails, recovery (which trains all blocks) runs, then rollback.
    config = _config(gates=Gates(step_kl=-1.0, step_ppl_increase=None), recovery=Recovery.ON_FAILURE)
    result = staged_apply(model, schedule, CALIB, VALID, config, tmp_path)
    assert [s.gate for s in result.steps] == ["rolled back", "rolled back"]
    assert all(s.recovery is not None and s.recovery["steps"] == 3 for s in result.steps)
    assert result.schedule.units == {} and sorted(result.frozen) == ["model.layers.0", "model.layers.2"]
    got = result.model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_cli_apply_staged_end_to_end(tmp_path, tokenizer, capsys):
    from tiny import tiny_model as tiny_vocab_model

    model = tiny_vocab_model("llama")
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    from autocompress.models import load_model

    run = _write_run(tmp_path, load_model(str(model_dir)).model, {"model.layers.0": Choice(bits=4, group_size=32),
                                       "model.layers.2": Choice(channel_ratio=0.25)}, {"model": str(model_dir)})
    argv = ["apply", str(run), "--staged", "--step-fraction", "0.05", "--calib-tokens", "1024",
            "--valid-tokens", "512", "--seq-len", "64", "--recovery-steps", "2", "--kd-seq-len", "64",
            "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "staged compression" in out and "validation perplexity" in out
    loaded, _ = load_compressed(run / "model")
    assert loaded.model.layers[0].self_attn.q_proj.bits == 4
    assert loaded.model.layers[2].mlp.down_proj.in_features == 96 - 24
    assert (run / "staged.json").exists() and (run / "staged" / "model" / "model.safetensors").exists()
    assert main(argv) == 2  # RUN/model exists now
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 2  # staged.json of a finished run: refused, not silently redone
    assert "--restart" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--restart"]) == 0
    capsys.readouterr()
    assert main(argv + ["--overwrite", "--restart", "--fade"]) == 0
    capsys.readouterr()
    steps = json.loads((run / "staged.json").read_text())["data"]["steps"]
    assert [bool(s["recovery"] and s["recovery"].get("fade")) for s in steps if "layers.2" in s["units"][0]] == [True]
    assert main(["apply", str(run), "--fade"]) == 2  # fading is a staged option
    assert "add --staged" in capsys.readouterr().err

    one_shot = ["apply", str(run), "--out", str(tmp_path / "one"), "--calib-tokens", "1024", "--valid-tokens", "512",
                "--seq-len", "64", "--threads", "1"]
    assert main(one_shot) == 0
    assert "validation perplexity" in capsys.readouterr().out
    loaded, _ = load_compressed(tmp_path / "one")
    assert loaded.model.layers[0].self_attn.q_proj.bits == 4


def test_a_failed_step_is_halved_until_the_offending_unit_is_frozen(tmp_path):
    model = tiny_model("llama", layers=4)
    fp = model_fingerprint(model)
    units = {f"model.layers.{i}": Choice(bits=8, group_size=32) for i in (0, 2, 3)}
    units["model.layers.1"] = Choice(bits=2, group_size=None)
    config = _config(step_fraction=1.0, gates=Gates(step_kl=0.002, step_ppl_increase=None))
    result = staged_apply(model, Schedule(fp, units), CALIB, VALID, config, tmp_path,
                          profile=_profile(model, [0, 2, 1, 3]), fingerprint=fp)
    history = [(len(s.units), s.gate) for s in result.steps]
    assert history == [(4, "rolled back"), (2, "passed"), (2, "rolled back"), (1, "rolled back"), (1, "passed")]
    assert result.steps[3].units == ["model.layers.1"] and result.steps[3].frozen == ["model.layers.1"]
    assert result.frozen == ["model.layers.1"]
    assert sorted(result.schedule.units) == ["model.layers.0", "model.layers.2", "model.layers.3"]


def test_final_recovery_runs_once_and_is_logged(tmp_path):
    model = tiny_model("llama", layers=3)
    schedule = Schedule(model_fingerprint(model), {"model.layers.1": Choice(channel_ratio=0.5)})
    config = _config(final_recovery_steps=4)
    result = staged_apply(model, schedule, CALIB, VALID, config, tmp_path)
    from autocompress.artifacts import read_artifact

    state = read_artifact(tmp_path / "staged.json", "staged", 1)
    final = state["final_recovery"]
    assert final["steps"] == 4 and final["before"]["kl"] > 0
    assert final["kept"] == (final["after"]["kl"] <= final["before"]["kl"])
    assert state["final"]["kl"] == (final["after"] if final["kept"] else final["before"])["kl"]
    assert abs(result.final.kl - state["final"]["kl"]) < 1e-6  # the JSON rounds to 6 digits
