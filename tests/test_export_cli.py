"""``autocompress export``: the verb end to end on tiny models, and its refusals."""
from __future__ import annotations

import gguf
import pytest
import torch

from autocompress.cli import main
from autocompress.compress.apply import apply
from autocompress.compress.saving import save_compressed
from autocompress.export.gguf_reader import gguf_to_torch
from autocompress.export.run import export_run
from autocompress.models import adapter_for, load_model, model_fingerprint
from autocompress.schedule import Choice, Schedule
from tiny import random_tokens, tiny_model


def saved(tmp_path, tokenizer, units) -> str:
    """A tiny Llama compressed by ``units(model)`` and saved with its tokenizer."""
    model = tiny_model("llama")
    schedule = Schedule(model_fingerprint(model), units(model))
    apply(model, schedule, random_tokens(8 * 32).view(8, 32), progress=False)
    return str(save_compressed(model, tokenizer, schedule, tmp_path / "model"))


def gguf_units(model):
    path = adapter_for(model).blocks_path
    return {f"{path}.0": Choice(gguf="Q8_0"), f"{path}.1": Choice(gguf="Q4_0", head_ratio=0.5),
            f"{path}.2": Choice(drop=True), "model.embed_tokens": Choice(gguf="Q8_0")}


def native_units(model):
    path = adapter_for(model).blocks_path
    return {f"{path}.{i}": Choice(bits=4, group_size=64) for i in range(3)}


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def test_a_gguf_space_schedule_is_exported_exactly_as_measured(tmp_path, tokenizer, capsys):
    model_dir = saved(tmp_path, tokenizer, gguf_units)
    out = tmp_path / "model.gguf"
    assert main(["export", model_dir, "--format", "gguf", "--out", str(out), "--kl-tokens", "512",
                 "--importance-tokens", "512", "--window", "64"]) == 0
    printed = capsys.readouterr().out
    assert "none: every tensor as measured" in printed and "llama-cli -m" in printed
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "deci"  # heads pruned in one block only
    assert reader.fields["deci.block_count"].contents() == 2
    ours = load_model(model_dir).model
    tokens = random_tokens(64, seed=3).view(2, 32)
    expected = logits(ours, tokens)
    got = logits(gguf_to_torch(out), tokens)
    assert (got - expected).abs().max() / expected.abs().max() <= 1e-4


def test_native_codes_are_requantized_and_the_added_kl_is_measured(tmp_path, tokenizer):
    model_dir = saved(tmp_path, tokenizer, native_units)
    result = export_run(model_dir, "gguf", tmp_path / "m.gguf", kl_tokens=512, importance_tokens=512, window=64,
                        progress=False)
    assert result.requantized == 21  # 7 linears x 3 blocks: 4-bit g64 -> Q4_K's fallback for 64-wide rows
    assert result.added_kl is not None and 0 < result.added_kl < 0.05
    assert {r.type for r in result.details.records if not r.exact} == {"Q5_0"}


def test_a_run_directory_exports_its_model(tmp_path, tokenizer):
    run = tmp_path / "run"
    run.mkdir()
    saved(run, tokenizer, gguf_units)  # RUN/model
    result = export_run(run, "gguf", tmp_path / "r.gguf", kl_tokens=0, importance_tokens=0, progress=False)
    assert result.out.is_file() and result.requantized == 0


@pytest.mark.parametrize("args, message", [
    (["--format", "gguf", "--out", "EXISTING"], "already exists; pass --overwrite"),
    (["--format", "compressed-tensors", "--out", "NEW"], "--format gguf"),  # per-layer shapes
])
def test_bad_exports_are_refused_in_one_line(tmp_path, tokenizer, capsys, args, message):
    model_dir = saved(tmp_path, tokenizer, gguf_units)
    (tmp_path / "EXISTING").write_text("keep me")
    args = [a.replace("EXISTING", str(tmp_path / "EXISTING")).replace("NEW", str(tmp_path / "new")) for a in args]
    assert main(["export", model_dir, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert (tmp_path / "EXISTING").read_text() == "keep me" and not (tmp_path / "new").exists()


def mixed_units(model):
    path = adapter_for(model).blocks_path
    return {f"{path}.0": Choice(bits=4, group_size=64), f"{path}.1": Choice(bits=8, group_size=64),
            f"{path}.2": Choice(bits=4, group_size=64)}


@pytest.mark.parametrize("units, layout", [(native_units, "standard"), (mixed_units, "portable")])
def test_compressed_tensors_auto_layout_is_standard_when_transformers_can_load_it(tmp_path, tokenizer, units, layout):
    model_dir = saved(tmp_path, tokenizer, units)
    result = export_run(model_dir, "compressed-tensors", tmp_path / "ct", progress=False)
    assert result.details.layout.value == layout and result.details.transformers_loadable
    assert sum(linear.bits < 16 for linear in result.details.linears) == 21
    assert (tmp_path / "ct" / "config.json").is_file()


def test_the_gguf_space_end_to_end_profile_search_apply_export(tmp_path, tokenizer, monkeypatch):
    """The verbs a user runs: the search measures GGUF types, apply ships them, export writes them verbatim."""
    tiny_model("llama").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text("\n\n".join(f"Paragraph {i} tells how the function returns a value. " * 5
                                                   for i in range(40)))
    monkeypatch.chdir(tmp_path)
    common = ["--data", "text.txt", "--threads", "1"]
    assert main(["profile", "model", "--out", "run", "--space", "gguf", "--tokens", "128", "--seq-len", "64",
                 "--no-roles", "--no-proxies", "--calib-tokens", "128", "--calib-seq-len", "64", *common]) == 0
    assert main(["search", "run", "--budget", "memory=40%", "--space", "gguf", "--trials", "8", "--holdout-tokens",
                 "128", "--window", "64", "--no-progress", "--threads", "1"]) == 0
    assert main(["apply", "run", "--calib-tokens", "128", "--seq-len", "64", "--valid-tokens", "128", *common]) == 0
    assert main(["export", "run", "--format", "gguf", "--out", "model.gguf", "--window", "64", "--kl-tokens", "0",
                 *common]) == 0
    schedule = Schedule.load(tmp_path / "run" / "schedule.json")
    assert any(choice.gguf for choice in schedule.units.values())
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    written = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(written.values()) - {"F32", "F16"}  # GGUF block types, as searched
    shipped = load_model("run/model").model
    tokens = random_tokens(64, seed=5).view(2, 32)
    expected = logits(shipped, tokens)
    assert (logits(gguf_to_torch(tmp_path / "model.gguf"), tokens) - expected).abs().max() / expected.abs().max() <= 1e-4
