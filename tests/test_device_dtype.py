"""``--device`` and ``--dtype``: how they resolve, that float32 on the CPU is unchanged by them,
that bfloat16 works end to end on the CPU, and that statistics stay float32 whatever the dtype.

Without a GPU the CUDA paths are exercised through the same functions with the device as a
parameter (``torch.device("cpu")`` here). ``torch.cuda.is_available`` is patched to False where
the test is about a machine without CUDA, so the tests mean the same on a GPU machine.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import random_tokens, tiny_model

from autocompress.cli import main
from autocompress.device import place, resolve_device, resolve_dtype
from autocompress.errors import UserError

SPACE = "name: tiny\ngroup_size: 32\nbits: [4, 16]\nmethod: gptq\nact_order: true\n"
PROFILE = ["--space", "space.yaml", "--data", "text.txt", "--tokens", "128", "--seq-len", "64", "--no-roles",
           "--no-proxies", "--calib-tokens", "128", "--calib-seq-len", "64", "--threads", "1"]
SEARCH = ["--budget", "memory=60%", "--space", "space.yaml", "--trials", "2", "--holdout-tokens", "128",
          "--window", "64", "--no-progress", "--threads", "1", "--storage", "run/study.journal"]
APPLY = ["--data", "text.txt", "--calib-tokens", "128", "--seq-len", "64", "--valid-tokens", "128", "--threads", "1"]
CPU32 = ["--device", "cpu", "--dtype", "float32"]
TOKENS = torch.arange(0, 384, 3).reshape(2, 64)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_cpu_and_float32_without_cuda(no_cuda):
    device = resolve_device("auto")
    assert device == torch.device("cpu") and resolve_dtype("auto", device) == torch.float32
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16  # the rule, no GPU needed
    assert [resolve_dtype(name, device) for name in ("bfloat16", "float16", "float32")] == \
        [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_is_refused_in_one_line_without_cuda(no_cuda, spec):
    with pytest.raises(UserError) as caught:
        resolve_device(spec)
    message = str(caught.value)
    assert "\n" not in message and "--device cpu" in message and "auto" in message


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu", "", "cuda:-1"])
def test_bad_device_spellings_are_refused(spec):
    with pytest.raises(UserError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["int8", "fp32", "bf16", "float64"])
def test_bad_dtype_spellings_are_refused(spec):
    with pytest.raises(UserError, match="expected auto, bfloat16, float16, float32"):
        resolve_dtype(spec, torch.device("cpu"))


VERBS = {
    "profile": ["profile", "model", "--out", "out"],
    "search": ["search", "run", "--budget", "memory=50%"],
    "apply": ["apply", "run"],
    "eval": ["eval", "model"],
    "transfer": ["transfer", "run", "model", "--budget", "memory=50%", "--out", "out"],
    "demo": ["demo", "--out", "out", "--reports", "reports"],
}


@pytest.mark.parametrize("verb", list(VERBS))
@pytest.mark.parametrize("flags", [["--device", "cuda"], ["--dtype", "int8"]])
def test_every_verb_refuses_a_bad_flag_in_one_line(no_cuda, tmp_path, monkeypatch, capsys, verb, flags):
    monkeypatch.chdir(tmp_path)
    assert main([*VERBS[verb], *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flags[0] in err, err
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer) -> Path:
    """model/ (tiny llama + tokenizer), text.txt and space.yaml."""
    root = tmp_path_factory.mktemp("device")
    tiny_model("llama").save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "text.txt").write_text("\n\n".join(f"Paragraph {i} tells how the function returns a value. " * 5
                                               for i in range(40)))
    (root / "space.yaml").write_text(SPACE)
    return root


def _pipeline(world: Path, where: Path, flags: list[str]) -> Path:
    """profile + search + apply of the world's model in ``where`` with ``flags`` on every verb."""
    where.mkdir()
    for name in ("model", "text.txt", "space.yaml"):
        (where / name).symlink_to(world / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(where)
        assert main(["profile", "model", "--out", "run", *PROFILE, *flags]) == 0
        assert main(["search", "run", *SEARCH, *flags]) == 0
        assert main(["apply", "run", *APPLY, *flags]) == 0
    return where / "run"


def _logits(model_dir: Path) -> torch.Tensor:
    from autocompress.compress.saving import load_compressed

    model, _ = load_compressed(model_dir)
    with torch.no_grad():
        return model(TOKENS).logits


def test_float32_on_the_cpu_is_what_it_was_without_the_flags(no_cuda, world, tmp_path):
    plain = _pipeline(world, tmp_path / "plain", [])
    flagged = _pipeline(world, tmp_path / "flagged", CPU32)
    profiles = [json.loads((run / "profile.json").read_text())["data"] for run in (plain, flagged)]
    assert profiles[0]["units"] == profiles[1]["units"] and profiles[0]["base_loss"] == profiles[1]["base_loss"]
    schedules = [json.loads((run / "schedule.json").read_text())["data"] for run in (plain, flagged)]
    assert schedules[0]["units"] == schedules[1]["units"]
    assert schedules[0]["fingerprint"] == schedules[1]["fingerprint"]
    assert torch.equal(_logits(plain / "model"), _logits(flagged / "model"))


def test_eval_in_bfloat16_on_the_cpu(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["eval", str(world / "model"), "--data", str(world / "text.txt"), "--tokens", "256", "--window", "64",
              "--decode-tokens", "2", "--threads", "1", "--device", "cpu"]
    assert main([*common, "--dtype", "float32", "--out", "f32.json"]) == 0
    assert main([*common, "--dtype", "bfloat16", "--reference", str(world / "model"), "--out", "bf16.json"]) == 0
    f32, bf16 = (json.loads((tmp_path / name).read_text())["data"] for name in ("f32.json", "bf16.json"))
    assert bf16["perplexity"] == pytest.approx(f32["perplexity"], rel=0.05)
    assert bf16["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the same bf16 model


def test_apply_in_bfloat16_with_rtn_and_gptq_choices(world, tmp_path, monkeypatch):
    from autocompress.models import load_model, model_fingerprint
    from autocompress.schedule import Choice, QuantMethod, Schedule

    loaded = load_model(str(world / "model"), dtype=torch.bfloat16, device=torch.device("cpu"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    units = {"model.layers.0": Choice(bits=4, group_size=32),
             "model.layers.1": Choice(bits=4, group_size=32, method=QuantMethod.GPTQ, act_order=True)}
    schedule = Schedule(model_fingerprint(loaded.model), units, {"model": str(world / "model")})
    (tmp_path / "run").mkdir()
    schedule.save(tmp_path / "run" / "schedule.json")
    monkeypatch.chdir(tmp_path)
    assert main(["apply", "run", *APPLY[:1], str(world / "text.txt"), *APPLY[2:], "--device", "cpu",
                 "--dtype", "bfloat16"]) == 0
    logits = _logits(tmp_path / "run" / "model")
    assert torch.isfinite(logits).all()


def test_statistics_from_a_bfloat16_model_are_float32_and_close(world):
    from autocompress.compress.calibrate import capture_block_inputs, collect_stats
    from autocompress.models import adapter_for

    tokens = random_tokens(256).reshape(4, 64)
    stats = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = place(tiny_model("llama"), torch.device("cpu"), dtype)
        block = adapter_for(model).blocks(model)[0]
        linears = {path: block.get_submodule(path) for path in adapter_for(model).linears.values()}
        inputs = capture_block_inputs(model, tokens)
        assert inputs.hidden.dtype == dtype
        stats[dtype] = collect_stats(block, inputs, linears, set(linears))
    for path, want in stats[torch.float32].items():
        got = stats[torch.bfloat16][path]
        assert got.sqnorm.dtype == torch.float32 and got.hessian.dtype == torch.float32
        assert torch.allclose(got.sqnorm, want.sqnorm, rtol=2e-2, atol=2e-2 * float(want.sqnorm.max()))
        assert torch.allclose(got.hessian, want.hessian, rtol=2e-2, atol=2e-2 * float(want.hessian.abs().max()))


def test_kl_paths_take_the_device_and_stay_float32():
    """The functions the CUDA path uses, run with ``torch.device("cpu")`` given explicitly."""
    from autocompress.evaluate import stream_metrics
    from autocompress.profile.sensitivity import trace_model
    from autocompress.search.measure import SwapEvaluator

    device = resolve_device("cpu")
    model = place(tiny_model("llama"), device, resolve_dtype("bfloat16", device))
    tokens = random_tokens(256)
    trace = trace_model(model, tokens.reshape(4, 64))
    assert trace.reference.lse.dtype == torch.float64 and trace.reference.expected.dtype == torch.float32
    kl, delta = trace.measure_final(trace.hidden[-1])
    assert kl == 0.0 and delta == 0.0  # the unchanged model against itself
    metrics = stream_metrics(model, tokens, window=64, reference=model, progress=False)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6) and torch.isfinite(torch.tensor(metrics["loss"]))
    evaluator = SwapEvaluator(model, [], tokens.reshape(4, 64), None)
    assert evaluator.holdout.device == device and evaluator.reference[0].dtype == torch.float16
    assert evaluator.measure({})["kl"] == pytest.approx(0.0, abs=1e-3)  # the reference is kept in fp16
