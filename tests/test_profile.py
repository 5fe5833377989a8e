"""The profiler on tiny random models: cached suffix re-runs equal full forwards, artifacts, reuse, CLI."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny import random_tokens, tiny_model

from autocompress.compress.apply import DroppedBlock, compress_block
from autocompress.compress.calibrate import token_batch
from autocompress.compress.prune import set_submodule
from autocompress.data import load_tokens
from autocompress.errors import UserError
from autocompress.models import LoadedModel, adapter_for
from autocompress.profile import Profile, ProfileSettings, profile_model
from autocompress.profile.run import profile_run, resolve_space
from autocompress.profile.sensitivity import trace_model
from autocompress.schedule import Choice, SparsityPattern
from autocompress.search.space import load_space, space_from_dict

FAST = ProfileSettings(tokens=256, seq_len=64, roles=False, progress=False)


def full_forward_kl(model, changed_model, rows):
    """Mean KL(original || changed) and loss delta from two complete forward passes."""
    with torch.no_grad():
        ref = F.log_softmax(model(input_ids=rows, use_cache=False).logits[:, :-1].float(), -1)
        new = F.log_softmax(changed_model(input_ids=rows, use_cache=False).logits[:, :-1].float(), -1)
    targets = rows[:, 1:, None]
    kl = (ref.exp() * (ref - new)).sum(-1).mean()
    delta = (ref.gather(-1, targets) - new.gather(-1, targets)).mean()
    return float(kl), float(delta)


CHOICES = {
    "bits=2": Choice(bits=2, group_size=16),
    "2:4": Choice(sparsity=0.5, pattern=SparsityPattern.TWO_FOUR),
    "heads=0.5": Choice(head_ratio=0.5),
    "channels=0.25": Choice(channel_ratio=0.25),
    "drop": Choice(drop=True),
}


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: soft-capped logits, the direct KL path
def test_suffix_rerun_equals_a_full_forward_with_the_block_replaced(family):
    model = tiny_model(family)
    rows = token_batch(random_tokens(256), 64)
    trace = trace_model(model, rows)
    assert trace.reference.linear is (family == "llama")
    blocks_path = adapter_for(model).blocks_path
    for label, choice in CHOICES.items():
        changed = compress_block(trace.blocks[1], 1, model, choice, trace.block_inputs(1))
        kl, delta = trace.measure_block(1, changed)
        replaced = copy.deepcopy(model)
        set_submodule(replaced, f"{blocks_path}.1", copy.deepcopy(changed))
        full_kl, full_delta = full_forward_kl(model, replaced, rows)
        assert kl > 1e-6, label
        assert kl == pytest.approx(full_kl, abs=1e-5, rel=1e-4), label
        assert delta == pytest.approx(full_delta, abs=1e-5), label


def test_an_unchanged_block_gives_exactly_zero_kl():
    model = tiny_model("llama")
    trace = trace_model(model, token_batch(random_tokens(256), 64))
    for index, block in enumerate(trace.blocks):
        out = trace.run_from(index, trace.hidden[index])
        kl, delta = trace.reference.compare(out)
        assert torch.count_nonzero(kl) == 0 and torch.count_nonzero(delta) == 0
        assert trace.measure_block(index, block) == (0.0, 0.0)


def test_dropping_a_block_feeds_its_input_onward():
    model = tiny_model("llama")
    rows = token_batch(random_tokens(256), 64)
    trace = trace_model(model, rows)
    kl, _ = trace.measure_block(2, DroppedBlock())
    final = trace.run_from(3, trace.hidden[2])
    assert kl == pytest.approx(float(trace.reference.compare(final)[0].mean()))
    assert kl > 1e-4


@pytest.fixture(scope="module")
def tiny_profile(tokenizer):
    model = tiny_model("llama")
    loaded = LoadedModel(model, tokenizer, "tiny-llama", "hub")
    stream = load_tokens("stdlib-docs", tokenizer, "calibration", 1024)
    settings = ProfileSettings(tokens=512, seq_len=64, role_tokens=512, progress=False)
    return profile_model(loaded, stream, load_space("default"), settings), model


def test_profile_measures_every_unit_and_choice(tiny_profile):
    profile, model = tiny_profile
    space = load_space("default")  # GPTQ act-order, groups [64, 128], embedding_bits
    labels = [label for label, _ in space.probe_choices()]
    assert labels[:2] == ["bits=3/g64", "bits=3/g128"] and "bits=2/g64" not in labels
    assert profile.labels() == labels
    embed_labels = [label for label, _ in space.embedding_choices()]
    assert embed_labels[:2] == ["embed:bits=4/g64", "embed:bits=4/g128"]
    assert list(profile.choices) == labels + embed_labels  # labels() leaves the embed: ones out
    assert profile.choices["bits=3/g64"] == space.quant_choice(3, 64).to_json()
    assert profile.choices["bits=3/g64"]["method"] == "gptq" and profile.choices["bits=3/g64"]["act_order"]
    embed = profile.choices["embed:bits=6/g128"]  # round-to-nearest: no Hessian serves a table's two roles
    assert (embed["bits"], embed["group_size"], embed["method"], embed["act_order"]) == (6, 128, "rtn", False)
    assert [u.name for u in profile.units] == [f"model.layers.{i}" for i in range(3)]
    assert profile.calibration_tokens == 512 and profile.granularity == "block"
    for unit in profile.units:
        assert set(unit.kl) == set(labels) == set(unit.loss_delta)
        assert all(v >= 0 for v in unit.kl.values())
        for group in (64, 128):
            assert unit.kl[f"bits=3/g{group}"] > unit.kl[f"bits=4/g{group}"] > unit.kl[f"bits=5/g{group}"] \
                > unit.kl[f"bits=8/g{group}"]
        assert unit.kl["channels=0.5"] > unit.kl["channels=0.25"]
        assert unit.parameters == sum(p.numel() for p in model.model.layers[unit.block].parameters())
        for proxy in ("block_influence", "weight_kurtosis", "weight_max_ratio", "activation_norm",
                      "fisher:bits=3/g64"):
            assert proxy in unit.proxies
        assert unit.proxies["fisher:bits=3/g64"] > unit.proxies["fisher:bits=8/g64"] > 0
        assert set(unit.roles) == {"lexical", "morphology", "word_class", "nesting", "prediction"}
        assert unit.dominant_role in unit.roles
    assert len(profile.role_curves["lexical"]) == 4  # embeddings + 3 blocks
    assert "fisher ~ all choices" in profile.proxy_spearman
    assert all(-1 <= rho <= 1 for rho in profile.proxy_spearman.values())


def test_profile_measures_the_embedding_and_the_untied_head(tiny_profile):
    profile, model = tiny_profile
    assert not model.config.tie_word_embeddings
    embed_labels = [label for label in profile.choices if label.startswith("embed:")]
    assert [(u.name, u.block, u.role) for u in profile.extra_units] == \
        [("model.embed_tokens", -1, "embedding"), ("lm_head", -1, "head")]
    assert profile.unit("lm_head") is profile.extra_units[1]
    for unit in profile.extra_units:
        assert unit.parameters == 384 * 64
        assert set(unit.kl) == set(embed_labels) == set(unit.loss_delta)
        assert unit.kl["embed:bits=4/g64"] > unit.kl["embed:bits=5/g64"] > unit.kl["embed:bits=6/g64"] \
            > unit.kl["embed:bits=8/g64"] > 0


def test_embedding_unit_kl_equals_a_full_forward_with_the_table_quantized(tokenizer):
    from autocompress.compress.quant_embedding import embedding_replacements
    from autocompress.profile.embedding import measure_embedding_units

    model = tiny_model("llama")
    rows = token_batch(random_tokens(256), 64)
    space = space_from_dict({"name": "e", "bits": [4, 16], "embedding_bits": [4, 16], "group_size": 32}, "test")
    (embedding, head) = measure_embedding_units(model, rows, space)
    for unit in (embedding, head):
        changed = copy.deepcopy(model)
        for path, module in embedding_replacements(model, unit.name, Choice(bits=4, group_size=32)).items():
            set_submodule(changed, path, module)
        kl, delta = full_forward_kl(model, changed, rows)
        assert kl > 1e-5
        # the original's log-probabilities are kept in 16 bits: the same KL against that reference
        with torch.no_grad():
            ref = F.log_softmax(model(input_ids=rows, use_cache=False).logits[:, :-1].float(), -1).half().float()
            new = F.log_softmax(changed(input_ids=rows, use_cache=False).logits[:, :-1].float(), -1)
        kl16 = float(F.kl_div(new, ref, log_target=True, reduction="sum")) / rows[:, 1:].numel()
        assert unit.kl["embed:bits=4"] == pytest.approx(kl16, rel=1e-4)
        assert unit.kl["embed:bits=4"] == pytest.approx(kl, rel=0.1)
        assert unit.loss_delta["embed:bits=4"] == pytest.approx(delta, abs=1e-4)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the model is left as it was
    assert not any("Quant" in type(m).__name__ for m in model.modules())


def test_additivity_check_per_bit_width(tiny_profile):
    profile, _ = tiny_profile
    # one check per bit width, at the space's first group size (64)
    assert [a.bits for a in profile.additivity] == [3, 4, 5, 6, 8]
    for check in profile.additivity:
        units_sum = sum(u.kl[f"bits={check.bits}/g64"] for u in profile.units)
        assert check.predicted_kl == pytest.approx(units_sum)
        assert check.measured_kl > 0
    by_bits = {a.bits: a.measured_kl for a in profile.additivity}
    assert by_bits[3] > by_bits[4] > by_bits[5] > by_bits[6] > by_bits[8]


def test_additivity_measurement_equals_a_full_forward_with_every_block_replaced():
    from autocompress.profile.additivity import measure_all_changed

    model = tiny_model("llama")
    rows = token_batch(random_tokens(256), 64)
    trace = trace_model(model, rows)
    choice = Choice(bits=3, group_size=16)
    replacements = {i: compress_block(b, i, model, choice, trace.block_inputs(i)) for i, b in enumerate(trace.blocks)}
    kl, delta = measure_all_changed(trace, replacements)
    replaced = copy.deepcopy(model)
    for i, block in replacements.items():
        set_submodule(replaced, f"model.layers.{i}", copy.deepcopy(block))
    full_kl, full_delta = full_forward_kl(model, replaced, rows)
    assert kl > 1e-4
    assert kl == pytest.approx(full_kl, abs=1e-5, rel=1e-4)
    assert delta == pytest.approx(full_delta, abs=1e-5)


def test_profile_json_round_trip(tiny_profile, tmp_path):
    profile, _ = tiny_profile
    profile.save(tmp_path / "profile.json")
    again = Profile.load(tmp_path / "profile.json")
    assert again.unit("model.layers.1").kl == profile.unit("model.layers.1").kl
    assert again.additivity == profile.additivity
    assert again.role_curves == profile.role_curves


def test_linear_granularity_measures_each_linear(tokenizer):
    model = tiny_model("llama")
    loaded = LoadedModel(model, tokenizer, "tiny-llama", "hub")
    # the old quant-linear (RTN, one group size) with bits 2, 4 and 16: fast, and plain bits=2 labels
    space = resolve_space(space_from_dict({**load_space("quant-linear").to_json(), "bits": [2, 4, 16], "group_size": 128,
                                           "method": "rtn", "act_order": False, "embedding_bits": []}))
    profile = profile_model(loaded, random_tokens(256), space, FAST)
    assert len(profile.units) == 3 * 7
    unit = profile.unit("model.layers.1.mlp.down_proj")
    assert unit.role == "down" and unit.parameters == 96 * 64
    assert unit.kl["bits=2"] > unit.kl["bits=4"] > 0
    # Only that one linear changed: the same as a full forward with it replaced.
    rows = token_batch(random_tokens(256), 64)
    changed = compress_block(model.model.layers[1], 1, model, Choice(), None,
                             linear_choices={"mlp.down_proj": space.quant_choice(2)})
    replaced = copy.deepcopy(model)
    set_submodule(replaced, "model.layers.1.mlp.down_proj", changed.mlp.down_proj)
    full_kl, _ = full_forward_kl(model, replaced, rows)
    assert unit.kl["bits=2"] == pytest.approx(full_kl, abs=1e-5, rel=1e-4)
    assert [a.bits for a in profile.additivity] == [2, 4]


def test_frozen_units_are_not_measured(tokenizer):
    model = tiny_model("llama")
    space = space_from_dict({"name": "t", "bits": [2, 16], "drop": True, "frozen": ["model.layers.0"]})
    profile = profile_model(LoadedModel(model, tokenizer, "tiny", "hub"), random_tokens(256), space, FAST)
    assert [u.name for u in profile.units] == ["model.layers.1", "model.layers.2"]
    assert profile.labels() == ["bits=2", "drop"]
    assert profile.unit("model.layers.2").kl["drop"] > 0


def test_too_few_tokens_is_a_user_error(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(UserError, match="fewer than the 4096"):
        profile_model(LoadedModel(model, tokenizer, "tiny", "hub"), random_tokens(300), load_space("quant-only"),
                      ProfileSettings(tokens=4096, roles=False, progress=False))


def test_linear_granularity_of_a_structural_space_is_refused():
    with pytest.raises(UserError, match="need granularity: block"):
        resolve_space("default", "linear")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("profile_run")
    dirs = []
    for seed in (0, 1):
        path = root / f"model{seed}"
        tiny_model("llama", seed=seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return dirs


def test_profile_run_reuses_and_refuses(tiny_dirs, tmp_path):
    settings = ProfileSettings(tokens=256, seq_len=64, roles=False, proxies=False, progress=False)
    first = profile_run(str(tiny_dirs[0]), tmp_path, space="quant-only", settings=settings)
    assert not first.reused and (tmp_path / "profile.json").exists()
    again = profile_run(str(tiny_dirs[0]), tmp_path, space="quant-only", settings=settings)
    assert again.reused and again.profile.to_json() == first.profile.to_json()
    with pytest.raises(UserError, match="another search space .*--force"):
        profile_run(str(tiny_dirs[0]), tmp_path, space="prune-only", settings=settings)
    with pytest.raises(UserError, match="another data"):
        profile_run(str(tiny_dirs[0]), tmp_path, space="quant-only",
                    settings=ProfileSettings(tokens=320, seq_len=64, roles=False, proxies=False, progress=False))
    with pytest.raises(UserError, match="another model"):
        profile_run(str(tiny_dirs[1]), tmp_path, space="quant-only", settings=settings)
    forced = profile_run(str(tiny_dirs[1]), tmp_path, space="quant-only", settings=settings, force=True)
    assert not forced.reused and forced.profile.model_fingerprint != first.profile.model_fingerprint


def test_profile_run_writes_its_calibration_rows_and_measures_with_them(tiny_dirs, tmp_path, tokenizer):
    from autocompress.run_calibration import CALIBRATION_FILE, load_calibration, rows_fingerprint

    space = space_from_dict({"name": "g", "bits": [3, 16], "group_size": 32, "method": "gptq", "act_order": True},
                            "test")
    settings = ProfileSettings(tokens=256, seq_len=64, roles=False, proxies=False, additivity=False, progress=False,
                               calib_tokens=512, calib_seq_len=128, calibration="first")
    outcome = profile_run(str(tiny_dirs[0]), tmp_path, space=space, settings=settings)
    recorded = outcome.profile.meta["calibration"]
    calibration = load_calibration(tmp_path, recorded["fingerprint"])
    assert (tmp_path / CALIBRATION_FILE).exists()
    assert tuple(calibration.rows.shape) == (4, 128) and calibration.mode == "first"
    assert recorded == {"mode": "first", "rows": 4, "seq_len": 128, "span": calibration.span,
                        "fingerprint": rows_fingerprint(calibration.rows)}
    split = load_tokens("stdlib-docs", tokenizer, "calibration", 512).tokens
    assert torch.equal(calibration.rows, split.view(4, 128))  # "first": the head of the split
    assert calibration.span >= 512

    # GPTQ's Hessians came from those rows: the same profile with them, another without them
    loaded = LoadedModel(tiny_model("llama", seed=0), tokenizer, "tiny", "hub")
    stream = load_tokens("stdlib-docs", tokenizer, "calibration", 256)
    again = profile_model(loaded, stream, space, settings, calibration=calibration)
    assert [u.kl for u in again.units] == [u.kl for u in outcome.profile.units]
    own_rows = profile_model(loaded, stream, space, settings)
    assert [u.kl for u in own_rows.units] != [u.kl for u in outcome.profile.units]

    # reuse checks the rows: other settings or other rows in the file are refused
    assert profile_run(str(tiny_dirs[0]), tmp_path, space=space, settings=settings).reused
    with pytest.raises(UserError, match="other calibration rows.*--force"):
        profile_run(str(tiny_dirs[0]), tmp_path, space=space,
                    settings=dataclasses.replace(settings, calibration="curated"))
    with pytest.raises(UserError, match="other calibration rows.*--force"):
        profile_run(str(tiny_dirs[0]), tmp_path, space=space, settings=dataclasses.replace(settings, calib_tokens=256))
    from autocompress.run_calibration import CalibrationSet, save_calibration

    save_calibration(tmp_path, CalibrationSet(calibration.rows.flip(0), "first", calibration.span))
    with pytest.raises(UserError, match="other calibration rows than profile.json recorded") as err:
        profile_run(str(tiny_dirs[0]), tmp_path, space=space, settings=settings)
    assert "\n" not in str(err.value)
    forced = profile_run(str(tiny_dirs[0]), tmp_path, space=space, settings=settings, force=True)
    assert not forced.reused and load_calibration(tmp_path, forced.profile.meta["calibration"]["fingerprint"])


def test_profile_run_picks_curated_rows_by_default(tiny_dirs, tmp_path):
    from autocompress.run_calibration import load_calibration

    assert (ProfileSettings().calib_tokens, ProfileSettings().calib_seq_len, ProfileSettings().calibration) == \
        (4096, 512, "curated")
    settings = ProfileSettings(tokens=256, seq_len=64, roles=False, proxies=False, additivity=False, progress=False,
                               calib_tokens=1024, calib_seq_len=128)
    space = space_from_dict({"name": "w", "bits": [16], "sparsity": [0.5]}, "test")  # Wanda norms from the rows
    outcome = profile_run(str(tiny_dirs[0]), tmp_path, space=space, settings=settings)
    calibration = load_calibration(tmp_path, outcome.profile.meta["calibration"]["fingerprint"])
    assert calibration.mode == "curated" and tuple(calibration.rows.shape) == (8, 128)
    assert calibration.span > 1024  # chosen from a larger pool; the search's holdout starts after it
    with pytest.raises(UserError, match="less than one row"):
        profile_run(str(tiny_dirs[0]), tmp_path / "small", space=space,
                    settings=dataclasses.replace(settings, calib_tokens=64))


def test_cli_profile_prints_tables_then_reuses(tiny_dirs, tmp_path, capsys):
    from autocompress.cli import main

    argv = ["profile", str(tiny_dirs[0]), "--out", str(tmp_path), "--space", "quant-only", "--tokens", "256",
            "--seq-len", "64", "--role-tokens", "512", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "most and least sensitive units" in out and "additivity" in out and "Spearman" in out
    assert "linguistic roles" in out and "wrote" in out
    assert main(argv) == 0
    assert "reused" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--space", "no-such-space"], "unknown search space"),
    (["--granularity", "linear"], "need granularity: block"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tiny_dirs, tmp_path, capsys, extra, message):
    from autocompress.cli import main

    status = main(["profile", str(tiny_dirs[0]), "--out", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_bad_option_exits_2(capsys):
    from autocompress.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["profile", "m", "--out", "x", "--tokens", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
