"""Transfer of learned schedules: coordinates, mapping across depths and families, budget repair, CLI."""
from __future__ import annotations

import copy

import pytest

from autocompress.cli import main
from autocompress.compress.apply import apply
from autocompress.compress.memory import MemoryModel
from autocompress.compress.tiny_models import random_tokens, sampled_tokens, tiny_model
from autocompress.errors import UserError
from autocompress.evaluate import perplexity
from autocompress.models import model_fingerprint
from autocompress.profile.artifact import Profile, UnitProfile
from autocompress.schedule import Choice, Schedule
from autocompress.search.budget import Budget
from autocompress.transfer import agnostic_choices, describe, transfer_schedule, warm_start_schedules
from autocompress.transfer.coordinates import model_coordinates, profile_summary
from autocompress.transfer.repair import no_upgrade_fits
from autocompress.transfer.sensitivity import from_summary
from space_helpers import rtn_space, space_file
from transfer_helpers import allocated_at_uniform, kl_between, memory_budget


def _measured_profile(model, space, tokens) -> Profile:
    """A small real profile: each block alone at each probe choice, KL to the original."""
    fingerprint = model_fingerprint(model)
    units = []
    for index, name in enumerate(space.units(model)):
        kl = {label: kl_between(model, apply(copy.deepcopy(model), Schedule(fingerprint, {name: choice}), progress=False),
                         tokens)
              for label, choice in space.probe_choices() if choice.bits in (2, 3, 4)}
        units.append(UnitProfile(name, index, kl=kl))
    return Profile("tiny-llama", fingerprint, "random", "d", space.name, "s", "block", tokens.numel(), 0.0,
                   {label: c.to_json() for label, c in space.probe_choices()}, units)


@pytest.fixture(scope="module")
def quant_space():
    return rtn_space("rtn-quant-only")  # the transfer maps bit widths: one group size, RTN


@pytest.fixture(scope="module")
def source(quant_space):
    """A tiny Llama (4 blocks), its measured profile and a schedule allocated from it at uniform-3-bit size."""
    model = tiny_model("llama", layers=4)
    profile = _measured_profile(model, quant_space, random_tokens(256, 2, 64, seed=1))
    return model, profile, allocated_at_uniform(model, quant_space, profile)


def test_coordinates_round_trip_through_schedule_json(source, tmp_path):
    model, profile, schedule = source
    path = schedule.save(tmp_path / "schedule.json")
    loaded = Schedule.load(path)
    entries = {e.name: e for e in agnostic_choices(loaded)}
    assert set(entries) == set(schedule.units)
    assert entries["model.layers.0"].relative_depth == 0.0
    assert entries["model.layers.3"].relative_depth == 1.0
    assert entries["model.layers.1"].relative_depth == pytest.approx(1 / 3, abs=1e-6)
    assert all(e.role == "block" and e.relative_size == pytest.approx(1.0) for e in entries.values())
    assert {n: e.choice for n, e in entries.items()} == schedule.units
    assert loaded.meta["source_model"]["blocks"] == 4 and loaded.meta["source_model"]["family"] == "llama"
    summary = loaded.meta["source_profile"]
    assert [u["relative_depth"] for u in summary["units"]] == pytest.approx([0, 1 / 3, 2 / 3, 1], abs=1e-6)
    # normalised by the median KL: ratios survive, the scale does not
    raw = profile.unit("model.layers.0").kl["bits=2"] / profile.unit("model.layers.3").kl["bits=2"]
    assert summary["units"][0]["kl"]["bits=2"] / summary["units"][3]["kl"]["bits=2"] == pytest.approx(raw)


def test_linear_coordinates_know_roles_and_sizes():
    model = tiny_model("phi3", layers=3, hidden=96, intermediate=160)
    coords = model_coordinates(model)
    qkv = coords["model.layers.2.self_attn.qkv_proj"]
    assert qkv.role == "qkv" and qkv.relative_depth == 1.0
    down = coords["model.layers.1.mlp.down_proj"]
    assert down.role == "down" and down.relative_depth == 0.5
    # gate_up (2 x 160 x 96) is bigger than o (96 x 96), relative to the mean linear
    assert coords["model.layers.0.mlp.gate_up_proj"].relative_size > 3 * coords["model.layers.0.self_attn.o_proj"].relative_size


def test_coordinates_are_inferred_for_a_schedule_without_them():
    schedule = Schedule("x", {"model.layers.0": Choice(bits=4), "model.layers.9.mlp.down_proj": Choice(bits=2)})
    entries = {e.name: e for e in agnostic_choices(schedule)}
    assert entries["model.layers.0"].role == "block" and entries["model.layers.0"].relative_depth == 0.0
    assert entries["model.layers.9.mlp.down_proj"].role == "down"
    assert entries["model.layers.9.mlp.down_proj"].relative_depth == 1.0
    with pytest.raises(UserError, match="cannot place unit"):
        agnostic_choices(Schedule("x", {"encoder.blocks.0": Choice(bits=4)}))


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_transfer_meets_the_budget_exactly_and_beats_uniform(source, quant_space, family):
    _, _, schedule = source
    target = tiny_model(family, layers=6, seed=1)
    uniform = Schedule.uniform(target, quant_space.quant_choice(3))
    budget, memory, limit = memory_budget(target, uniform)
    result = transfer_schedule(schedule, target, budget, space=quant_space)
    result.validate(target)
    assert memory.schedule_bytes(result) <= limit
    assert no_upgrade_fits(result, budget, quant_space, quant_space.units(target))
    assert result.meta["transfer"]["losses"] == "source-profile"
    # the source spent its bits on the first block and saved on the last: so does the transfer
    assert result.units["model.layers.0"].bits > result.units["model.layers.5"].bits
    held_out = random_tokens(256, 2, 64, seed=2)
    kl_transfer = kl_between(target, apply(copy.deepcopy(target), result, progress=False), held_out)
    kl_uniform = kl_between(target, apply(copy.deepcopy(target), uniform, progress=False), held_out)
    assert kl_transfer < kl_uniform
    text = sampled_tokens(target, seed=3)
    ppl_transfer = perplexity(apply(copy.deepcopy(target), result, progress=False), text, window=96)
    ppl_uniform = perplexity(apply(copy.deepcopy(target), uniform, progress=False), text, window=96)
    assert ppl_transfer < ppl_uniform


def test_transfer_between_granularities_matches_fused_roles():
    space = rtn_space("rtn-quant-linear")
    llama = tiny_model("llama", layers=4)
    bits = {"q": 8, "k": 4, "v": 3, "o": 4, "gate": 2, "up": 4, "down": 3}
    paths = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    schedule = describe(Schedule(model_fingerprint(llama), {f"model.layers.{i}.{paths[r]}": space.quant_choice(b)
                                                            for i in range(4) for r, b in bits.items()}), llama)
    phi3 = tiny_model("phi3", layers=6)
    memory = MemoryModel.from_model(phi3)
    budget = Budget.parse(["memory=100%"], memory)  # everything fits: the mapping shows unrepaired
    result = transfer_schedule(schedule, phi3, budget, space=space)
    mapped = {name: Choice.from_json(e["mapped"]) for name, e in result.meta["transfer"]["units"].items()}
    # qkv takes the size-weighted mean of q (8), k (4), v (3): q is twice k and v here -> 5.75 -> snapped to 4 or 8
    assert mapped["model.layers.0.self_attn.qkv_proj"].bits in (4, 8)
    assert mapped["model.layers.3.mlp.gate_up_proj"].bits == 3  # mean of gate 2 and up 4
    assert mapped["model.layers.5.mlp.down_proj"].bits == 3
    assert memory.schedule_bytes(result) <= budget.limits[0].value


def test_linear_summary_read_on_the_same_model_gives_back_its_kl():
    # k_proj is much smaller than down_proj; reading a linear-grained summary on the model it came
    # from must return the measured KLs (in units of the summary's scale), not KLs times unit size
    llama = tiny_model("llama", layers=3)
    coordinates = model_coordinates(llama)
    names = [n for n, c in coordinates.items() if c.role in ("k", "down")]
    assert len({round(coordinates[n].relative_size, 3) for n in names}) == 2
    units = [UnitProfile(n, coordinates[n].block, role=coordinates[n].role, kl={"bits=2": 1.0 + i, "bits=3": 0.5})
             for i, n in enumerate(names)]
    profile = Profile("tiny", model_fingerprint(llama), "d", "d", "s", "s", "linear", 64, 0.0, {}, units)
    summary = profile_summary(profile, coordinates)
    table = from_summary(summary, coordinates, names)
    for i, name in enumerate(names):
        assert table.label_kl(name, "bits=2") == pytest.approx((1.0 + i) / summary["scale"], rel=1e-4)


def test_neighbours_move_tied_linears_together():
    from autocompress.search.decisions import build_slots
    from autocompress.transfer.sensitivity import LossTable
    from autocompress.transfer.transfer import neighbours

    space = rtn_space("rtn-quant-linear")  # q/k/v and gate/up tied
    llama = tiny_model("llama", layers=4)
    uniform = Schedule(model_fingerprint(llama), {u: space.quant_choice(3) for u in space.units(llama)})
    budget, memory, limit = memory_budget(llama, uniform)
    found = neighbours(uniform, llama, budget, space, LossTable(model_coordinates(llama), {}, "prior"), count=3)
    assert len(found) == 3
    slots = build_slots(space, llama)
    for schedule in found:
        assert memory.schedule_bytes(schedule) <= limit
        assert all(len({schedule.units[u].bits for u in slot.members}) == 1 for slot in slots)
        changed = [slot for slot in slots if schedule.units[slot.members[0]].bits != 3]
        assert len(changed) == 2 and {schedule.units[c.members[0]].bits for c in changed} == {2, 4}


def test_budget_below_the_minimum_is_one_clear_error(source, quant_space):
    _, _, schedule = source
    target = tiny_model("qwen2", layers=6)
    budget = Budget.parse(["memory=5%"], MemoryModel.from_model(target))
    with pytest.raises(UserError, match="below the minimum"):
        transfer_schedule(schedule, target, budget, space=quant_space)


def test_warm_start_schedules_fit_and_differ(source, quant_space, tmp_path):
    _, _, schedule = source
    schedule.save(tmp_path / "schedule.json")
    target = tiny_model("qwen2", layers=6, seed=1)
    budget, memory, limit = memory_budget(target, Schedule.uniform(target, quant_space.quant_choice(3)))
    schedules = warm_start_schedules(tmp_path, target, quant_space, budget)
    assert len(schedules) >= 3
    assert all(memory.schedule_bytes(s) <= limit for s in schedules)
    assert len({tuple(sorted((k, v.bits) for k, v in s.units.items())) for s in schedules}) == len(schedules)
    with pytest.raises(UserError, match="no schedule found"):
        warm_start_schedules(tmp_path / "missing", target, quant_space, budget)


# -- CLI -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(source, tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("transfer")
    _, _, schedule = source
    schedule.save(root / "run" / "schedule.json")
    space_file(root, "rtn-quant-only")
    target = root / "qwen2"
    tiny_model("qwen2", layers=6, seed=1, vocab=len(tokenizer)).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return root


def _one_line_error(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


def test_cli_transfer_writes_schedule_and_prints_budget(saved, capsys):
    out = saved / "run2"
    assert main(["transfer", str(saved / "run"), str(saved / "qwen2"), "--budget", "memory=50%",
                 "--space", str(saved / "rtn-quant-only.yaml"), "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.5" in printed and "memory=50%" in printed and "% used" in printed
    assert "check: KL" in printed and "kept" in printed
    result = Schedule.load(out / "schedule.json")
    assert result.meta["agnostic"]["model.layers.5"]["relative_depth"] == 1.0
    assert result.meta["transfer"]["target_model"]["family"] == "qwen2"
    check = result.meta["transfer"]["check"]
    assert check["tokens"] == 2048 and 1 < len(check["candidates"]) <= 1 + 6 + 2  # transfer, exchanges, neighbours
    kept = check["candidates"][check["chosen"]]["kl"]
    assert kept == min(c["kl"] for c in check["candidates"])


def test_cli_transfer_without_check(saved, capsys):
    out = saved / "run3"
    assert main(["transfer", str(saved / "run"), str(saved / "qwen2"), "--budget", "memory=60%",
                 "--space", str(saved / "rtn-quant-only.yaml"), "--out", str(out), "--check-tokens", "0"]) == 0
    assert "check: KL" not in capsys.readouterr().out
    assert Schedule.load(out / "schedule.json").meta["transfer"]["check"] is None
    _one_line_error(capsys, ["transfer", str(saved / "run"), str(saved / "qwen2"), "--budget", "memory=60%",
                             "--check-count", "-1"], "--check-count must be 0 or more")


def test_cli_incompatible_targets_fail_with_one_line(saved, capsys, tokenizer):
    from transformers import GPTNeoXConfig, LlamaConfig, AutoModelForCausalLM

    neox = saved / "neox"
    AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=384, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64)).save_pretrained(neox)
    tokenizer.save_pretrained(neox)
    _one_line_error(capsys, ["transfer", str(saved / "run"), str(neox), "--budget", "memory=60%"], "not supported")
    empty = saved / "no-blocks"
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=384, hidden_size=32, num_hidden_layers=0,
                                                 num_attention_heads=4, intermediate_size=64)).save_pretrained(empty)
    tokenizer.save_pretrained(empty)
    _one_line_error(capsys, ["transfer", str(saved / "run"), str(empty), "--budget", "memory=60%"],
                    "no decoder blocks")
    _one_line_error(capsys, ["transfer", str(saved / "run"), str(saved / "qwen2"), "--budget", "memory=3%",
                             "--space", str(saved / "rtn-quant-only.yaml"), "--out", str(saved / "x")],
                    "below the minimum")


def test_search_warm_start_enqueues_the_transfer_first(source, quant_space, tmp_path, tokenizer):
    from search_helpers import make_run

    from autocompress.search.study import SearchSettings, search

    _, _, schedule = source
    schedule.save(tmp_path / "source" / "schedule.json")
    space = space_file(tmp_path, "rtn-quant-only")
    run = make_run(tmp_path, tokenizer, space=space)
    settings = SearchSettings(run_dir=str(run), budget=("memory=60%",), trials=8, space=space,
                              warm_start=str(tmp_path / "source"), holdout_tokens=1024, window=128,
                              calibration_tokens=512, progress=False)
    result = search(settings)
    trials = sorted(result.trials, key=lambda r: r.number)
    warm = [r for r in trials if r.source == "warm-start"]
    assert len(warm) >= 3  # the transfer, its neighbours and exchanges
    assert [r.source for r in trials[: len(warm)]] == ["warm-start"] * len(warm)
    assert all(r.feasible for r in warm)
    assert all(r.measured_kl is not None for r in warm)
