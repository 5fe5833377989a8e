"""Peak memory per verb on synthetic Llama models: profile, search, apply and eval, each in its own process.

    python bench/memory.py --sizes tiny
    python bench/memory.py --sizes 0.5b,1.1b --threads 2
    python bench/memory.py --sizes 1.1b --dtype float32 --verbs profile,eval

For each size a Llama-architecture model with random bf16 weights (small std, so activations
stay finite) is written once to ``bench_out/memory/models/<size>`` (safetensors shards of at
most 1 GiB, the SmolLM2 tokenizer beside them, vocab 49152). These models are for memory and
speed only, never for quality. Each verb then runs as a child process (``autocompress VERB ...
--dtype D --device cpu --threads T``) on small token counts, and reports as it ends its peak
resident set size (``VmHWM`` from ``/proc/self/status``, or its own children's if higher) and,
on CUDA (``--device cuda``), ``torch.cuda.max_memory_allocated``. The table puts each peak against the model's 16-bit size
and the issue's limit, ``1.3 x bf16 size + 1 GiB``; the ``import`` row is the floor every verb
pays (Python, torch, transformers, autocompress).

Logs and run folders go to ``bench_out/memory/runs/<size>-<dtype>-<device>/``, the numbers to
``bench_out/memory/<size>-<dtype>-<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# bench/*.py must not shadow library modules in this process or in the children it starts.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench_out" / "memory"
GIB = 1 << 30
SHARD_BYTES = 1 << 30
VERBS = ("import", "profile", "search", "apply", "eval", "eval-compressed")
DEFAULT_VERBS = ("import", "profile", "search", "apply", "eval")
NEEDS = {"search": "profile", "apply": "search", "eval-compressed": "apply"}  # verb -> verb it reads from
# tiny: the untied 49152 x 512 embedding and head are two thirds of its weights and stay 16-bit,
# so 4-bit blocks bring it down only to ~77% of its size.
BUDGETS = {"tiny": "memory=85%"}
DEFAULT_BUDGET = "memory=60%"
SPACE_YAML = "name: mem\ngroup_size: 128\nmethod: gptq\nact_order: true\nbits: [4, 16]\n"


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that fix a Llama decoder's parameter count (untied embeddings, no biases)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 49152

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every weight of ``LlamaForCausalLM`` with this shape, as (name, shape), in file order."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            p = f"model.layers.{i}"
            out += [(f"{p}.input_layernorm.weight", (self.hidden,)),
                    (f"{p}.self_attn.q_proj.weight", (self.hidden, self.hidden)),
                    (f"{p}.self_attn.k_proj.weight", (kv, self.hidden)),
                    (f"{p}.self_attn.v_proj.weight", (kv, self.hidden)),
                    (f"{p}.self_attn.o_proj.weight", (self.hidden, self.hidden)),
                    (f"{p}.post_attention_layernorm.weight", (self.hidden,)),
                    (f"{p}.mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                    (f"{p}.mlp.up_proj.weight", (self.intermediate, self.hidden)),
                    (f"{p}.mlp.down_proj.weight", (self.hidden, self.intermediate))]
        return out + [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]

    def parameters(self) -> int:
        """Number of parameters."""
        total = 0
        for _, shape in self.tensors():
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total

    def config(self) -> dict:
        """The ``config.json`` of a ``LlamaForCausalLM`` with this shape, stored in bfloat16."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
                "vocab_size": self.vocab, "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "head_dim": self.hidden // self.heads,
                "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
                "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "initializer_range": 0.02,
                "use_cache": True}


SIZES = {
    "tiny": LlamaShape(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=4),  # ~74M, a smoke test
    "0.5b": LlamaShape(hidden=1024, intermediate=2816, layers=32, heads=16, kv_heads=4),  # ~0.46B
    "1.1b": LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),  # TinyLlama's shape
    "3b": LlamaShape(hidden=3200, intermediate=8640, layers=26, heads=32, kv_heads=8),  # ~3.1B
}


@dataclass(frozen=True)
class BenchSettings:
    """Token counts and runtime options passed to every verb."""

    dtype: str = "bfloat16"
    device: str = "cpu"
    threads: int = 2
    data: str = "stdlib-docs"
    tokens: int = 256
    seq_len: int = 128
    calib_tokens: int = 256
    trials: int = 3
    holdout_tokens: int = 256
    budget: str | None = None  # None: BUDGETS' entry for the size, else DEFAULT_BUDGET
    valid_tokens: int = 256
    eval_tokens: int = 1024
    eval_window: int = 512
    search_cache_mib: int | None = None  # search --cache-mib (None: the search's default)


@dataclass(frozen=True)
class VerbResult:
    """What one verb's child process used: peak RSS and device bytes, wall seconds, exit status."""

    verb: str
    returncode: int
    peak_rss: int
    seconds: float
    peak_device: int | None = None
    log: str = ""


def build_model(name: str, shape: LlamaShape, folder: Path, *, seed: int = 0, std: float = 0.02,
                tokenizer=None) -> Path:
    """Write a random-weight bf16 Llama model with ``shape`` to ``folder`` once; return ``folder``.

    Weights are drawn one tensor at a time and written in shards of at most 1 GiB, so even the
    3B model never sits in this process's memory whole. Norm weights are ones; every matrix is
    N(0, std). The folder appears only when complete (written as ``<folder>.part``, then renamed).
    ``tokenizer`` (one whose vocabulary fits ``shape.vocab``) is saved beside the weights; by
    default the SmolLM2 tokenizer is copied.
    """
    if (folder / "config.json").exists():
        return folder
    import torch  # noqa: PLC0415 (the children's numbers must not depend on what the parent imported)
    from safetensors.torch import save_file  # noqa: PLC0415

    staging = folder.with_name(folder.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for tensor_name, tensor_shape in shape.tensors():
        nbytes = 2 * _numel(tensor_shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((tensor_name, tensor_shape))
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for index, shard in enumerate(shards):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for tensor_name, tensor_shape in shard:
            if len(tensor_shape) == 1:
                tensors[tensor_name] = torch.ones(tensor_shape, dtype=torch.bfloat16)
            else:
                tensors[tensor_name] = (torch.randn(tensor_shape, generator=generator) * std).to(torch.bfloat16)
            weight_map[tensor_name] = filename
        save_file(tensors, str(staging / filename), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index_json = {"metadata": {"total_size": 2 * shape.parameters()}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    (staging / "config.json").write_text(json.dumps(shape.config(), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(staging))
    else:
        _copy_tokenizer(staging)
    (staging / "SYNTHETIC.txt").write_text(f"Synthetic {name} Llama model, random weights (seed {seed}, std {std}): "
                                           f"for memory and speed benchmarks only, never for quality.\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _copy_tokenizer(folder: Path) -> None:
    """Copy the SmolLM2 tokenizer files (converting the alias once if it never was)."""
    from autocompress.models import cache_dir  # noqa: PLC0415

    source = cache_dir() / "models" / "smollm2-135m" / "hf"
    if not (source / "tokenizer.json").exists():
        from autocompress.models import load_model  # noqa: PLC0415

        load_model("smollm2-135m")  # fetches and converts the alias, tokenizer included
    for path in source.iterdir():
        if path.is_file() and path.name != "config.json" and not path.name.endswith(".safetensors"):
            shutil.copy2(path, folder / path.name)


def verb_argv(verb: str, model: Path, run: Path, space: Path, settings: BenchSettings, budget: str) -> list[str]:
    """The ``autocompress`` arguments for ``verb`` (``import``: none, the child only imports)."""
    common = ["--dtype", settings.dtype, "--device", settings.device, "--threads", str(settings.threads)]
    s = settings
    if verb == "import":
        return []
    if verb == "profile":
        return ["profile", str(model), "--out", str(run), "--space", str(space), "--data", s.data,
                "--tokens", str(s.tokens), "--seq-len", str(s.seq_len), "--no-roles", "--no-proxies",
                "--calib-tokens", str(s.calib_tokens), "--calib-seq-len", str(s.seq_len), *common]
    if verb == "search":
        cache = ["--cache-mib", str(s.search_cache_mib)] if s.search_cache_mib else []
        return ["search", str(run), "--budget", budget, "--space", str(space), "--trials", str(s.trials),
                "--holdout-tokens", str(s.holdout_tokens), "--window", str(s.seq_len), "--no-progress", *cache,
                *common]
    if verb == "apply":
        return ["apply", str(run), "--data", s.data, "--calib-tokens", str(s.calib_tokens),
                "--seq-len", str(s.seq_len), "--valid-tokens", str(s.valid_tokens), *common]
    if verb in ("eval", "eval-compressed"):
        target = model if verb == "eval" else run / "model"
        return ["eval", str(target), "--data", s.data, "--tokens", str(s.eval_tokens),
                "--window", str(s.eval_window), "--decode-tokens", "0", "--out", str(run / f"{verb}.json"), *common]
    raise ValueError(f"unknown verb {verb!r}")


def run_verb(verb: str, argv: list[str], log: Path, settings: BenchSettings) -> VerbResult:
    """Run ``autocompress argv`` in a child process and return its peak RSS, device peak and time.

    The peak is the child's own ``VmHWM`` (read by the child as it ends), or its children's if
    higher. Not ``ru_maxrss`` from ``os.wait4``: Linux folds the memory the child had before
    ``exec`` (this process's, when Popen uses vfork) into it, so a bloated parent would inflate
    every verb. That figure is the fallback when the child died without reporting.
    """
    peak_file = log.with_suffix(".peak.json")
    peak_file.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(settings.threads), MKL_NUM_THREADS=str(settings.threads),
               TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(peak_file), *argv]
    tick = time.perf_counter()
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - tick
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    peak_rss, peak_device = usage.ru_maxrss * 1024, None
    if peak_file.exists():  # absent when the child was killed (out of memory, say): keep wait4's figure
        peak = json.loads(peak_file.read_text())
        peak_rss = max(peak["vm_hwm"], peak["children_maxrss"])
        peak_device = peak.get("device_peak_allocated")
    return VerbResult(verb, process.returncode, peak_rss, seconds, peak_device, str(log))


def child_main(peak_file: str, argv: list[str]) -> int:
    """In the child: run ``autocompress argv`` (or only import it), then record the device peak."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415, F401

    from autocompress.cli import main as cli_main  # noqa: PLC0415

    try:
        code = cli_main(argv) if argv else 0
    finally:
        peak = {"vm_hwm": _vm_hwm(), "children_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak["device_peak_allocated"] = torch.cuda.max_memory_allocated()
            peak["device_peak_reserved"] = torch.cuda.max_memory_reserved()
        Path(peak_file).write_text(json.dumps(peak))
    return code


def _vm_hwm() -> int:
    """This process's peak resident set size in bytes (``VmHWM``, reset by ``exec``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: not Linux


def bench_size(name: str, verbs: list[str], settings: BenchSettings, say) -> list[VerbResult]:
    """Build (once) and benchmark one size; ``say`` prints a progress line."""
    shape = SIZES[name]
    model = OUT / "models" / name
    if not (model / "config.json").exists():
        say(f"[dim]{name}: writing {shape.parameters() / 1e9:.2f}B random bf16 parameters to {model}[/dim]")
        build_model(name, shape, model)
    run = OUT / "runs" / f"{name}-{settings.dtype}-{settings.device.replace(':', '')}"
    if "profile" in verbs:
        shutil.rmtree(run, ignore_errors=True)  # profile/search/apply would otherwise reuse the last run
    run.mkdir(parents=True, exist_ok=True)
    logs = run.parent / f"{run.name}.logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    space = OUT / "space.yaml"
    space.write_text(SPACE_YAML)
    results: list[VerbResult] = []
    failed: set[str] = set()
    for verb in verbs:
        need = NEEDS.get(verb)
        if need in failed or (need and need not in verbs and not _has_output(need, run)):
            say(f"[yellow]{name}: {verb} skipped ({need} did not run or failed)[/yellow]")
            failed.add(verb)
            continue
        if verb == "search":  # a search of the same budget again: a new study, not a refused one
            for stale in ("study.db", "study.db-wal", "study.db-shm"):
                (run / stale).unlink(missing_ok=True)
        say(f"[dim]{name}: {verb} ...[/dim]")
        result = run_verb(verb, verb_argv(verb, model, run, space, settings, settings.budget or BUDGETS.get(name, DEFAULT_BUDGET)), logs / f"{verb}.log", settings)
        results.append(result)
        if result.returncode != 0:
            failed.add(verb)
            tail = Path(result.log).read_text(errors="replace").strip().splitlines()[-15:]
            say(f"[red]{name}: {verb} exited with {result.returncode}; last lines of {result.log}:[/red]")
            say("\n".join(tail), markup=False)
    return results


def _has_output(verb: str, run: Path) -> bool:
    return {"profile": run / "profile.json", "search": run / "schedule.json", "apply": run / "model"}[verb].exists()


def limit_bytes(bf16_bytes: int) -> float:
    """The issue's ceiling for a verb's peak RSS: 1.3 x the model's bf16 size + 1 GiB."""
    return 1.3 * bf16_bytes + GIB


def results_table(name: str, shape: LlamaShape, results: list[VerbResult], settings: BenchSettings):
    """A rich table: one row per verb, peak RSS against the bf16 size and the limit."""
    from rich.table import Table  # noqa: PLC0415

    bf16 = 2 * shape.parameters()
    cuda = settings.device.startswith("cuda")
    table = Table(title=f"{name}: {shape.parameters() / 1e9:.3f}B parameters, {settings.dtype} on {settings.device}, "
                        f"{settings.threads} thread(s)")
    for column in ("verb", "peak RSS GiB", "bf16 size GiB", "ratio", "limit GiB", "within limit",
                   *(["peak device GiB", "device / bf16"] if cuda else []), "wall s", "exit"):
        table.add_column(column, justify="left" if column == "verb" else "right")
    for r in results:
        within = r.peak_rss <= limit_bytes(bf16)
        device = []
        if cuda:
            device = ["-", "-"] if r.peak_device is None else [f"{r.peak_device / GIB:.2f}", f"{r.peak_device / bf16:.2f}"]
        table.add_row(r.verb, f"{r.peak_rss / GIB:.2f}", f"{bf16 / GIB:.2f}", f"{r.peak_rss / bf16:.2f}",
                      f"{limit_bytes(bf16) / GIB:.2f}", "[green]yes[/green]" if within else "[red]no[/red]",
                      *device, f"{r.seconds:.1f}", str(r.returncode))
    return table


def _parse_list(text: str, allowed, what: str) -> list[str]:
    from autocompress.errors import UserError  # noqa: PLC0415

    items = [item.strip().lower() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise UserError(f"--{what} {text!r}: unknown {', '.join(unknown) or 'empty list'}; "
                        f"give a comma-separated subset of {', '.join(allowed)}")
    return items


def main() -> int:
    """Parse the options, benchmark each size and print one table per size."""
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child_main(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = BenchSettings()
    parser.add_argument("--sizes", default="tiny", help=f"comma-separated, of {', '.join(SIZES)} (default tiny)")
    parser.add_argument("--verbs", default=",".join(DEFAULT_VERBS), help=f"comma-separated, of {', '.join(VERBS)}")
    parser.add_argument("--dtype", default=d.dtype, choices=("bfloat16", "float16", "float32"),
                        help="--dtype given to every verb (default bfloat16; float32 to compare)")
    parser.add_argument("--device", default=d.device, help="--device given to every verb (default cpu)")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads per verb (default 2)")
    parser.add_argument("--data", default=d.data)
    parser.add_argument("--tokens", type=int, default=d.tokens, help="profile: tokens measured (default 256)")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="row length of profile, search, apply (default 128)")
    parser.add_argument("--calib-tokens", type=int, default=d.calib_tokens, help="profile and apply (default 256)")
    parser.add_argument("--trials", type=int, default=d.trials, help="search trials (default 3)")
    parser.add_argument("--holdout-tokens", type=int, default=d.holdout_tokens, help="search (default 256)")
    parser.add_argument("--budget", default=d.budget, help=f"search budget (default {DEFAULT_BUDGET}, tiny {BUDGETS['tiny']})".replace("%", "%%"))
    parser.add_argument("--valid-tokens", type=int, default=d.valid_tokens, help="apply (default 256)")
    parser.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="eval (default 1024)")
    parser.add_argument("--eval-window", type=int, default=d.eval_window, help="eval window (default 512)")
    parser.add_argument("--search-cache-mib", type=int, default=None,
                        help="search --cache-mib (default: the search's own, half the model's 16-bit size)")
    args = parser.parse_args()

    from rich.console import Console  # noqa: PLC0415

    from autocompress.errors import UserError  # noqa: PLC0415

    console = Console(width=160)
    say = lambda *a, **k: (console.print(*a, **k), sys.stdout.flush())  # noqa: E731
    try:
        sizes = _parse_list(args.sizes, SIZES, "sizes")
        verbs = _parse_list(args.verbs, VERBS, "verbs")
        verbs = [verb for verb in VERBS if verb in verbs]  # dependency order whatever the order given
        for option in ("threads", "tokens", "seq_len", "calib_tokens", "trials", "holdout_tokens",
                       "valid_tokens", "eval_tokens", "eval_window"):
            if getattr(args, option) <= 0:
                raise UserError(f"--{option.replace('_', '-')} {getattr(args, option)}: give a positive integer")
    except UserError as exc:
        print(f"bench/memory.py: error: {exc}", file=sys.stderr)
        return 2
    settings = BenchSettings(dtype=args.dtype, device=args.device, threads=args.threads, data=args.data,
                             tokens=args.tokens, seq_len=args.seq_len, calib_tokens=args.calib_tokens,
                             trials=args.trials, holdout_tokens=args.holdout_tokens, budget=args.budget,
                             valid_tokens=args.valid_tokens, eval_tokens=args.eval_tokens, eval_window=args.eval_window,
                             search_cache_mib=args.search_cache_mib)
    say(f"verbs {', '.join(verbs)}; {settings.dtype} on {settings.device}, {settings.threads} thread(s); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for name in sizes:
        results = bench_size(name, verbs, settings, say)
        say(results_table(name, SIZES[name], results, settings))
        record = {"size": name, "shape": asdict(SIZES[name]), "parameters": SIZES[name].parameters(),
                  "bf16_bytes": 2 * SIZES[name].parameters(), "settings": asdict(settings),
                  "results": [asdict(r) for r in results]}
        partial = "" if set(verbs) >= set(DEFAULT_VERBS) else "-" + "-".join(verbs)  # keep the full run's record
        target = OUT / f"{name}-{settings.dtype}-{settings.device.replace(':', '')}{partial}.json"
        target.write_text(json.dumps(record, indent=2))
        say(f"[dim]written {target.relative_to(ROOT)}[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
