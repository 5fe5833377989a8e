"""Windows start with BOS exactly when the tokenizer adds one, BOS is never scored, and without
BOS every window and figure is what it was (tiny models of every family, two tiny tokenizers)."""
from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from tiny import FAMILIES, tiny_model

from autocompress.calibration import calibration_rows, select_windows
from autocompress.compress.calibrate import token_batch
from autocompress.compress.distill import DistillConfig, kd_loss
from autocompress.compress.staged import Gates, Recovery, StagedConfig, staged_apply
from autocompress.data import bos_id, load_tokens, with_bos
from autocompress.evaluate import evaluate, stream_metrics, windows
from autocompress.models import LoadedModel
from autocompress.profile import ProfileSettings, profile_model
from autocompress.profile.run import choose_calibration, profile_run
from autocompress.run_calibration import CalibrationSet, load_calibration
from autocompress.schedule import Choice, QuantMethod, Schedule
from autocompress.search.decisions import build_slots
from autocompress.search.measure import SwapEvaluator
from autocompress.search.space import space_from_dict

WINDOW = 32
GPTQ = {"name": "bos-gptq", "bits": [4, 16], "group_size": 16, "method": "gptq"}  # needs calibration rows


@pytest.fixture(params=["bos", "plain"])
def tok(request, tokenizer, bos_tokenizer):
    """Each test runs with a tokenizer that adds BOS and with one that does not."""
    return bos_tokenizer if request.param == "bos" else tokenizer


def watch(model, rows: list[torch.Tensor]):
    """Append every row of input ids ``model`` is called with to ``rows`` (one-token decoding
    steps left out); returns the hook's handle."""
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] > 1:
            rows.extend(ids.reshape(-1, ids.shape[-1]).clone())

    return model.register_forward_pre_hook(hook, with_kwargs=True)


@contextmanager
def fed_rows(model):
    """The rows of input ids ``model`` is called with inside the ``with`` block (see :func:`watch`)."""
    rows: list[torch.Tensor] = []
    handle = watch(model, rows)
    try:
        yield rows
    finally:
        handle.remove()


def assert_windows_of(rows, stream: torch.Tensor, bos: int | None, lengths: set[int]) -> None:
    """Each row is BOS (only when the tokenizer adds it) then an aligned window of ``stream``
    whose length is one of ``lengths``, and nothing else."""
    assert rows
    for row in rows:
        text = row
        if bos is not None:
            assert row[0] == bos
            text = row[1:]
            assert not (text == bos).any()
        n = text.numel()
        assert n in lengths
        assert any(torch.equal(stream[i * n:(i + 1) * n], text) for i in range(stream.numel() // n))


def text_nll(model, rows: torch.Tensor, bos: int | None) -> tuple[float, int]:
    """Mean next-token loss of ``model`` over the text tokens it can score in ``rows`` [n, W]
    (all W with BOS in front, W - 1 without), and how many that is."""
    inputs = with_bos(rows, bos)
    with torch.no_grad():
        logits = model(input_ids=inputs, use_cache=False).logits.float()
    first = 0 if bos is not None else 1  # the text token predicted by position 0
    targets = rows[:, first:]
    log_probs = F.log_softmax(logits[:, :-1], dim=-1)
    assert targets.shape == log_probs.shape[:2]
    return float(-log_probs.gather(-1, targets.unsqueeze(-1)).mean()), targets.numel()


def calibration_stream(tokenizer, count: int) -> torch.Tensor:
    return load_tokens("stdlib-docs", tokenizer, "calibration", count).tokens


# ---------------------------------------------------------------------------------------
# The helpers


def test_bos_id_is_the_token_the_tokenizer_puts_first(tokenizer, bos_tokenizer):
    from transformers import PreTrainedTokenizerFast

    assert bos_id(bos_tokenizer) == bos_tokenizer.convert_tokens_to_ids("<bos>")
    assert bos_tokenizer("Some text")["input_ids"][0] == bos_id(bos_tokenizer)
    assert bos_id(tokenizer) is None and bos_id(None) is None
    # a tokenizer that names a BOS token but does not add it (SmolLM2, GPT-2) has none
    named = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tokenizer.backend_tokenizer), bos_token="<eos>",
                                    eos_token="<eos>")
    assert named.bos_token_id is not None and bos_id(named) is None


def test_with_bos_and_the_window_cutters():
    stream = torch.arange(50)
    rows = stream[:48].view(4, 12)
    assert with_bos(rows, None) is rows
    assert torch.equal(with_bos(rows, 99), torch.cat([torch.full((4, 1), 99), rows], dim=1))
    assert torch.equal(windows(stream, 12), rows) and torch.equal(windows(stream, 12, None), rows)
    assert torch.equal(windows(stream, 12, 99), with_bos(rows, 99))
    assert torch.equal(token_batch(stream, 12, 3), rows[:3]) and token_batch(stream, 12, 3, bos=None).shape == (3, 12)
    assert torch.equal(token_batch(stream, 12, 3, bos=99), with_bos(rows[:3], 99))


# ---------------------------------------------------------------------------------------
# Evaluation


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluation_windows(family, tok):
    model = tiny_model(family)
    stream = load_tokens("stdlib-docs", tok, "evaluation", 4 * WINDOW + 5).tokens
    bos = bos_id(tok)
    with fed_rows(model) as fed:
        result = evaluate(model, stream, model_name="tiny", data_name="d", window=WINDOW, decode_tokens=2,
                          progress=False, bos=bos)
    assert_windows_of(fed, stream, bos, {WINDOW, 64})  # the windows and the decoding prompt
    assert result.tokens == 4 * WINDOW  # text tokens
    loss, scored = text_nll(model, windows(stream, WINDOW), bos)
    assert scored == 4 * (WINDOW if bos is not None else WINDOW - 1)
    assert result.loss == pytest.approx(loss, rel=1e-5)
    if bos is None:  # exactly as before: the same call as without the tokenizer's say
        before = stream_metrics(model, stream, window=WINDOW, progress=False)
        assert (result.loss, result.perplexity) == (before["loss"], before["perplexity"])


# ---------------------------------------------------------------------------------------
# Profiling and calibration


@pytest.mark.parametrize("family", FAMILIES)
def test_profile_windows(family, tok):
    model = tiny_model(family)
    loaded = LoadedModel(model, tok, "tiny", "hub")
    bos = bos_id(tok)
    stream = calibration_stream(tok, 6 * WINDOW)
    settings = ProfileSettings(tokens=4 * WINDOW, seq_len=WINDOW, roles=False, additivity=False, fisher_rows=2,
                               progress=False)
    space = space_from_dict({**GPTQ, "embedding_bits": [4, 16]}, "test")
    calibration = CalibrationSet(calibration_rows("first", stream, 2, WINDOW, bos=bos), "first", 2 * WINDOW)
    with fed_rows(model) as fed:
        profile = profile_model(loaded, stream, space, settings, calibration=calibration)
    assert_windows_of(fed, stream, bos, {WINDOW})  # measured rows, calibration rows, gradients, embedding units
    assert profile.calibration_tokens == 4 * WINDOW  # text tokens
    loss, _ = text_nll(model, token_batch(stream[: 4 * WINDOW], WINDOW), bos)
    assert profile.base_loss == pytest.approx(loss, rel=1e-5)
    if bos is None:  # exactly as before
        again = profile_model(LoadedModel(model, None, "tiny", "hub"), stream, space, settings,
                              calibration=CalibrationSet(calibration_rows("first", stream, 2, WINDOW), "first",
                                                         2 * WINDOW))
        assert again.data_fingerprint == profile.data_fingerprint and again.base_loss == profile.base_loss
        assert [u.kl for u in again.units + again.extra_units] == [u.kl for u in profile.units + profile.extra_units]


def test_role_probes_read_text_tokens_only(bos_tokenizer):
    from autocompress.profile.run import _role_states
    from autocompress.profile.sensitivity import trace_model

    model = tiny_model("llama")
    loaded = LoadedModel(model, bos_tokenizer, "tiny", "hub")
    bos = bos_id(bos_tokenizer)
    stream = calibration_stream(bos_tokenizer, 8 * WINDOW)
    trace = trace_model(model, token_batch(stream[: 4 * WINDOW], WINDOW, bos=bos), reference=False)
    for role_tokens in (3 * WINDOW, 8 * WINDOW):  # from the trace, then from rows of their own
        settings = ProfileSettings(seq_len=WINDOW, role_tokens=role_tokens)
        with fed_rows(model) as fed:
            states, ids = _role_states(loaded, trace, stream, settings, bos)
        assert torch.equal(ids, stream[:role_tokens])  # no BOS among the probed tokens
        assert all(s.shape[0] == role_tokens for s in states)
        if role_tokens <= 4 * WINDOW:
            assert torch.equal(states[1], trace.hidden[1][:, 1:].reshape(-1, states[1].shape[-1])[:role_tokens])
        else:
            assert_windows_of(fed, stream, bos, {WINDOW})


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_windows(family, tok):
    model = tiny_model(family)
    loaded = LoadedModel(model, tok, "tiny", "hub")
    bos = bos_id(tok)
    settings = ProfileSettings(calib_tokens=2 * WINDOW, calib_seq_len=WINDOW)  # curated: hard windows need the model
    with fed_rows(model) as fed:
        calibration = choose_calibration(loaded, "stdlib-docs", settings)
    pool = calibration_stream(tok, calibration.span)
    assert_windows_of(fed, pool, bos, {WINDOW})  # every candidate the model scored
    assert_windows_of(list(calibration.rows), pool, bos, {WINDOW})
    assert calibration.rows.shape == (2, WINDOW + (bos is not None))


def test_coverage_reads_text_tokens_and_first_rows_take_the_head(bos_tokenizer):
    bos = bos_id(bos_tokenizer)
    stream = calibration_stream(bos_tokenizer, 16 * WINDOW)
    plain = select_windows(stream, 4, WINDOW)
    with_first = select_windows(stream, 4, WINDOW, bos=bos)
    assert with_first.indices == plain.indices and torch.equal(with_first.rows, with_bos(plain.rows, bos))
    first = calibration_rows("first", stream, 3, WINDOW, bos=bos)
    assert torch.equal(first, windows(stream[: 3 * WINDOW], WINDOW, bos))


def test_profile_run_writes_bos_rows_and_reuses_them(tmp_path, bos_tokenizer):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    bos_tokenizer.save_pretrained(model_dir)
    settings = ProfileSettings(tokens=4 * WINDOW, seq_len=WINDOW, roles=False, proxies=False, additivity=False,
                               progress=False, calib_tokens=2 * WINDOW, calib_seq_len=WINDOW, calibration="first")
    space = space_from_dict(GPTQ, "test")
    first = profile_run(str(model_dir), tmp_path / "run", space=space, settings=settings)
    bos = bos_id(bos_tokenizer)
    rows = load_calibration(tmp_path / "run").rows
    assert rows.shape == (2, WINDOW + 1) and bool((rows[:, 0] == bos).all())
    assert first.profile.meta["calibration"]["seq_len"] == WINDOW + 1  # the row as fed, BOS included
    assert profile_run(str(model_dir), tmp_path / "run", space=space, settings=settings).reused


# ---------------------------------------------------------------------------------------
# Search measurement


def _quantized_picks(slots) -> dict[str, str]:
    return {slot.name: next(o.label for o in slot.options if o.choice.quantized) for slot in slots}


@pytest.mark.parametrize("family", FAMILIES)
def test_search_measurement_windows(family, tok):
    model = tiny_model(family)
    bos = bos_id(tok)
    stream = calibration_stream(tok, 6 * WINDOW)
    holdout = windows(stream[2 * WINDOW:], WINDOW, bos)
    calibration = calibration_rows("first", stream, 2, WINDOW, bos=bos)
    slots = build_slots(space_from_dict({**GPTQ, "embedding_bits": [4, 16]}, "test"), model)
    with fed_rows(model) as fed:
        evaluator = SwapEvaluator(model, slots, holdout, calibration)
        measured = evaluator.measure(_quantized_picks(slots))
    assert_windows_of(fed, stream, bos, {WINDOW})
    assert measured["kl"] > 0
    loss, _ = text_nll(model, windows(stream[2 * WINDOW:], WINDOW), bos)
    assert evaluator.original_quality()["loss"] == pytest.approx(loss, rel=1e-3)  # reference kept in 16 bits


def test_search_prepare_puts_bos_first(tmp_path, bos_tokenizer):
    from search_helpers import PROFILE_TOKENS, make_run
    from space_helpers import space_file

    from autocompress.search.study import SearchSettings, prepare

    space = space_file(tmp_path, "rtn-default")
    run = make_run(tmp_path, bos_tokenizer, space=space)
    bos = bos_id(bos_tokenizer)
    settings = SearchSettings(str(run), ("memory=60%",), space=space, holdout_tokens=256, window=64, progress=False)
    ctx = prepare(settings)
    assert bool((ctx.calibration[:, 0] == bos).all())  # the run's rows
    held = load_tokens("stdlib-docs", bos_tokenizer, "calibration", 256, start=PROFILE_TOKENS).tokens
    assert torch.equal(ctx.holdout, windows(held, 64, bos)) and ctx.holdout_meta["tokens"] == 256
    (run / "calibration.safetensors").unlink()  # a run without rows: calibration windows from the split
    assert bool((prepare(settings).calibration[:, 0] == bos).all())


def test_apply_run_puts_bos_first(tmp_path, bos_tokenizer, monkeypatch):
    import autocompress.models as models_module
    from search_helpers import PROFILE_TOKENS, make_run

    from autocompress.compress.apply_run import ApplyConfig, apply_run

    space = space_from_dict(GPTQ, "test")
    run = make_run(tmp_path, bos_tokenizer, space=space)
    fed: list[torch.Tensor] = []
    load_model = models_module.load_model

    def load_and_watch(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        watch(loaded.model, fed)
        return loaded

    monkeypatch.setattr(models_module, "load_model", load_and_watch)
    Schedule.uniform(load_model(str(tmp_path / "model")).model, Choice(bits=4, group_size=16, method=QuantMethod.GPTQ)
                     ).save(run / "schedule.json")
    apply_run(ApplyConfig(run_dir=str(run), calib_tokens=4 * WINDOW, seq_len=WINDOW, valid_tokens=4 * WINDOW,
                          eval_window=WINDOW, progress=False))
    # calibration rows from the head of the split, validation windows after the run's rows
    assert_windows_of(fed, calibration_stream(bos_tokenizer, PROFILE_TOKENS + 4 * WINDOW), bos_id(bos_tokenizer),
                      {WINDOW})


# ---------------------------------------------------------------------------------------
# Distillation (staged apply)


def test_staged_apply_windows(tmp_path, tok):
    model = tiny_model("llama")
    bos = bos_id(tok)
    stream = calibration_stream(tok, 12 * WINDOW)
    calib, valid = stream[: 8 * WINDOW], stream[8 * WINDOW:]
    schedule = Schedule.uniform(model, Choice(bits=4, group_size=16, method=QuantMethod.GPTQ))
    config = StagedConfig(one_shot=True, gates=Gates(step_ppl_increase=None), recovery=Recovery.ALWAYS,
                          distill=DistillConfig(steps=2, batch_size=2, seq_len=WINDOW, lora_rank=2),
                          calib_seq_len=WINDOW, eval_window=WINDOW, final_recovery_steps=1, progress=False)
    with fed_rows(model) as fed:  # the teacher is a deep copy: the hook goes with it
        result = staged_apply(model, schedule, calib, valid, config, tmp_path, tokenizer=tok)
    assert_windows_of(fed, stream, bos, {WINDOW, 128})  # statistics, proxies (128), distillation, gates
    assert result.original.loss > 0


def test_distillation_leaves_the_bos_position_out_of_the_hidden_loss():
    torch.manual_seed(0)
    logits, hidden, other = torch.randn(2, 5, 7), torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    other[:, 0] += 100.0  # an outlier at the BOS position (as massive activations are)
    _, _, with_first = kd_loss(logits, logits, 1.0, [other], [hidden], 1.0)
    _, _, without = kd_loss(logits, logits, 1.0, [other], [hidden], 1.0, hidden_from=1)
    expected = F.mse_loss(other[:, 1:], hidden[:, 1:]) / hidden[:, 1:].pow(2).mean()
    assert without == pytest.approx(float(expected)) and with_first > 100 * without


# ---------------------------------------------------------------------------------------
# Transfer's measurements of the target


def test_transfer_windows(bos_tokenizer):
    from autocompress.transfer.alignment import block_signature
    from autocompress.transfer.check import check_rows

    model = tiny_model("gpt2")  # learned positions: a row may not outgrow the context
    bos = bos_id(bos_tokenizer)
    stream = calibration_stream(bos_tokenizer, 600)
    rows = check_rows(model, stream, window=512, bos=bos)
    assert rows.shape[1] == model.config.max_position_embeddings and bool((rows[:, 0] == bos).all())
    assert check_rows(model, stream, window=512).shape[1] == model.config.max_position_embeddings
    with fed_rows(model) as fed:
        block_signature(model, stream, seq_len=WINDOW, bos=bos)
    assert_windows_of(fed, stream, bos, {WINDOW})


@pytest.mark.real
def test_smollm2_adds_no_bos(smollm2):
    assert bos_id(smollm2.tokenizer) is None  # its figures are the ones measured before BOS was handled

