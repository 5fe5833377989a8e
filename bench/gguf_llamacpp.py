"""GGUF exports measured by the real llama.cpp, against llama.cpp's own recipes.

Needs the binaries of ``bench/llamacpp.sh build``. On SmolLM2-135M (``smollm2``) and the
``stdlib-docs`` corpus it:

1. exports the 16-bit model as GGUF (``autocompress.export``: every tensor F16, norms F32);
2. builds llama.cpp's recipes from that file with ``llama-quantize`` (Q8_0, Q6_K, Q5_K_M,
   Q4_K_M, Q3_K_M), each without and with an importance matrix from ``llama-imatrix`` on
   the calibration split;
3. profiles and searches the ``gguf`` space once per target size (the size of a recipe's
   file), applies the schedule and exports it: its tensors are written as measured;
4. checks agreement: a schedule mixing types that also prunes heads and channels and drops
   a block is exported, and ``llama-perplexity`` on it is compared with autocompress's own
   perplexity of the compressed model, scored as llama-perplexity scores (the second half of
   each window, the text tokenized as one string);
5. runs ``llama-perplexity`` on every file (the same evaluation text) and prints one table
   of file size and perplexity.

Run: ``bench/llamacpp.sh build && .venv/bin/python bench/gguf_llamacpp.py [--out bench_out/gguf]``.
Results are cached in ``OUT/results.json``; a rerun measures only what is missing.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from autocompress.artifacts import atomic_write_bytes
from autocompress.compress.apply import apply
from autocompress.compress.apply_run import ApplyConfig, apply_run
from autocompress.compress.memory import dense_bytes
from autocompress.compress.saving import save_compressed
from autocompress.data import Split, read_documents, split_of
from autocompress.export.gguf_writer import export_gguf
from autocompress.export.llamacpp import llamacpp_bin
from autocompress.export.run import export_run
from autocompress.models import adapter_for, load_model, model_fingerprint
from autocompress.profile.run import ProfileSettings, profile_run
from autocompress.schedule import Choice, Schedule
from autocompress.search.study import SearchSettings, search

RECIPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M")
console = Console()


def tool(name: str, *args: str, threads: int) -> str:
    """Run ``llama-<name>`` and return its combined output (raises with the tail on failure)."""
    command = [str(llamacpp_bin() / f"llama-{name}"), *args, "-t", str(threads)] if name != "quantize" \
        else [str(llamacpp_bin() / "llama-quantize"), *args, str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-{name} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout + done.stderr


def write_text(path: Path, tokenizer, split: Split, tokens: int) -> None:
    """The first documents of ``split`` joined by blank lines, at least ``tokens`` tokens long."""
    pieces, count = [], 0
    for doc in read_documents("stdlib-docs"):
        if split_of(doc) is not split:
            continue
        pieces.append(doc)
        count += len(tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"])
        if count >= tokens * 1.05:
            break
    atomic_write_bytes(path, "\n\n".join(pieces).encode())


def llama_perplexity(model: Path, text: Path, chunks: int, threads: int) -> float:
    """llama-perplexity's final estimate on ``text`` (windows of 512, ``chunks`` of them)."""
    out = tool("perplexity", "-m", str(model), "-f", str(text), "-c", "512", "-b", "512",
               "--chunks", str(chunks), threads=threads)
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if not match:
        raise RuntimeError(f"no perplexity in llama-perplexity's output:\n{out[-2000:]}")
    return float(match.group(1))


@torch.no_grad()
def llamacpp_style_perplexity(model, tokenizer, text: Path, chunks: int, n_ctx: int = 512) -> float:
    """Perplexity scored as llama-perplexity does: the text tokenized as one string, windows of
    ``n_ctx`` (BOS first when the tokenizer adds one), the second half of each window scored."""
    ids = torch.tensor(tokenizer(text.read_text(), add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    first = n_ctx // 2
    nll, counted = 0.0, 0
    for chunk in range(min(chunks, ids.numel() // n_ctx)):
        window = ids[chunk * n_ctx:(chunk + 1) * n_ctx].clone()
        if bos is not None:
            window[0] = bos
        logits = model(input_ids=window[None], use_cache=False).logits[0].float()
        log_probs = F.log_softmax(logits[first:n_ctx - 1], dim=-1)
        nll -= log_probs.gather(-1, window[first + 1:, None]).sum().item()
        counted += n_ctx - 1 - first
    return math.exp(nll / counted)


def agreement_schedule(model) -> Schedule:
    """Mixed GGUF types, pruned heads and channels, and one dropped block (SmolLM2's 30 blocks)."""
    adapter = adapter_for(model)
    path = adapter.blocks_path
    types = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K")
    units = {f"{path}.{i}": Choice(gguf=types[i % len(types)]) for i in range(len(adapter.blocks(model)))}
    units[f"{path}.4"] = Choice(gguf="Q5_0", head_ratio=0.34)
    units[f"{path}.9"] = Choice(gguf="Q4_K", channel_ratio=0.25)
    units[f"{path}.20"] = Choice(drop=True)
    units[adapter.embeddings[0]] = Choice(gguf="Q8_0")
    return Schedule(model_fingerprint(model), units)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/gguf")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--calib-tokens", type=int, default=16384, help="text for llama-imatrix")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--profile-tokens", type=int, default=512)
    parser.add_argument("--targets", default="Q6_K,Q5_K_M,Q4_K_M,Q3_K_M",
                        help="recipes whose file size the searched schedules must fit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--part", choices=["all", "recipes", "searched", "agreement", "table"], default="all",
                        help="one part only (agreement needs no profile and can run beside the others)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def record(name: str, path: Path, **extra) -> None:
        on_disk = json.loads(results_path.read_text()) if results_path.exists() else {}
        results.update({**on_disk, name: {"file": str(path), "bytes": path.stat().st_size, **extra}})
        atomic_write_bytes(results_path, json.dumps(results, indent=1).encode())

    if args.part == "table":
        print_table(results)
        return

    chunks = args.eval_tokens // 512
    original = load_model("smollm2-135m")
    tokenizer = original.tokenizer
    eval_text, calib_text = out / "eval.txt", out / "calib.txt"
    if not eval_text.exists():
        write_text(eval_text, tokenizer, Split.EVALUATION, args.eval_tokens)
        write_text(calib_text, tokenizer, Split.CALIBRATION, args.calib_tokens)

    # 1-2. The 16-bit GGUF and llama.cpp's recipes built from it.
    f16 = out / "smollm2-f16.gguf"
    if args.part == "agreement":
        agreement(args, out, tokenizer, eval_text, calib_text, chunks, record)
        print_table(json.loads(results_path.read_text()))
        return
    if not f16.exists():
        export_gguf(original.model, tokenizer, f16, progress=False)
    if "F16" not in results:
        record("F16", f16, ppl=llama_perplexity(f16, eval_text, chunks, args.threads))
    imatrix = out / "imatrix.gguf"
    if not imatrix.exists():
        tool("imatrix", "-m", str(f16), "-f", str(calib_text), "-c", "512", "--chunks", str(args.calib_tokens // 512),
             "-o", str(imatrix), threads=args.threads)
    for recipe in RECIPES if args.part in ("all", "recipes") else ():
        for weighted in (False, True):
            name = f"{recipe}{' + imatrix' if weighted else ''}"
            if name in results:
                continue
            path = out / f"smollm2-{recipe}{'-imatrix' if weighted else ''}.gguf"
            tool("quantize", *(["--imatrix", str(imatrix)] if weighted else []), str(f16), str(path), recipe,
                 threads=args.threads)
            record(name, path, ppl=llama_perplexity(path, eval_text, chunks, args.threads))
            console.print(f"{name}: {path.stat().st_size / 2**20:.1f} MiB, ppl {results[name]['ppl']:.3f}")

    # 3. Searched schedules of the gguf space, one per target file size.
    # What a GGUF file holds beyond autocompress's stored bytes: metadata, tokenizer, padding, F32 norms.
    overhead = f16.stat().st_size - dense_bytes(original.model)
    run = out / "run"
    settings = ProfileSettings(tokens=args.profile_tokens, seq_len=256, roles=False, proxies=False, additivity=False)
    for target in args.targets.split(",") if args.part in ("all", "searched") else ():
        name = f"searched <= {target}"
        if name in results:
            continue
        tick = time.perf_counter()
        if not (run / "profile.json").exists():
            profile_run("smollm2-135m", run, space="gguf", settings=settings)
            console.print(f"profile (gguf space): {time.perf_counter() - tick:.0f} s")
        budget = results[target]["bytes"] - overhead
        target_run = out / f"run-{target}"
        target_run.mkdir(exist_ok=True)
        for item in ("profile.json", "calibration.safetensors"):
            if (run / item).exists() and not (target_run / item).exists():
                (target_run / item).write_bytes((run / item).read_bytes())
        for stale in ("study.db", "search.json", "schedule.json"):
            (target_run / stale).unlink(missing_ok=True)
        search(SearchSettings(str(target_run), (f"memory={budget}b",), trials=args.trials, space="gguf",
                              progress=False, holdout_tokens=4096, window=512))
        apply_run(ApplyConfig(target_run, out=target_run / "model", overwrite=True, progress=False))
        path = out / f"smollm2-searched-{target}.gguf"
        export_run(target_run, "gguf", path, overwrite=True, kl_tokens=0, progress=False)
        record(name, path, ppl=llama_perplexity(path, eval_text, chunks, args.threads),
               seconds=time.perf_counter() - tick)
        console.print(f"{name}: {path.stat().st_size / 2**20:.1f} MiB, ppl {results[name]['ppl']:.3f}")

    # 4. Agreement with autocompress on a mixed, pruned, block-dropping schedule.
    if args.part in ("all", "agreement") and "agreement" not in results:
        agreement(args, out, tokenizer, eval_text, calib_text, chunks, record)
    print_table(json.loads(results_path.read_text()))


def agreement(args, out: Path, tokenizer, eval_text: Path, calib_text: Path, chunks: int, record) -> None:
    """llama-perplexity of the exported agreement schedule against autocompress's own figure."""
    model = load_model("smollm2-135m").model
    schedule = agreement_schedule(model)
    calibration = torch.tensor(tokenizer(calib_text.read_text(), add_special_tokens=False)["input_ids"])
    apply(model, schedule, calibration[: 16 * 512].view(16, 512), progress=False)
    model_dir = out / "agreement-model"
    save_compressed(model, tokenizer, schedule, model_dir, overwrite=True)
    path = out / "smollm2-agreement.gguf"
    export_run(model_dir, "gguf", path, overwrite=True, kl_tokens=0, importance_tokens=0, progress=False)
    ours = llamacpp_style_perplexity(model, tokenizer, eval_text, chunks)
    theirs = llama_perplexity(path, eval_text, chunks, args.threads)
    record("agreement", path, ppl=theirs, autocompress_ppl=ours, relative=abs(theirs / ours - 1))


def print_table(results: dict) -> None:
    """File size and llama-perplexity of every row, smallest file first."""
    table = Table(title="SmolLM2-135M in llama.cpp: llama-perplexity on stdlib-docs (evaluation split)")
    for column in ("model", "file MiB", "perplexity", "note"):
        table.add_column(column, justify="left" if column in ("model", "note") else "right")
    for name, row in sorted(results.items(), key=lambda item: item[1]["bytes"]):
        note = ""
        if name == "agreement":
            note = f"autocompress {row['autocompress_ppl']:.3f}, {100 * row['relative']:.2f}% apart"
        table.add_row(name, f"{row['bytes'] / 2**20:.1f}", f"{row['ppl']:.3f}", note)
    console.print(table)


if __name__ == "__main__":
    main()
