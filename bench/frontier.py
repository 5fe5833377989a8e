"""Quality per byte: the searched schedule against every recipe a user would pick instead.

At each size (a share of the 16-bit model, bytes as stored, embeddings and norms included)
the searched schedule of the ``default`` space (bit width and group size per block with GPTQ
act-order, pruning, the embedding table) is compared with every baseline that fits:

* uniform RTN (g128), GPTQ act-order (g128 and g64) and HQQ (g64) at 3/4/5/6/8 bits on the
  decoder linears, with the embedding table at 16, 8 or 6 bits (RTN g128; HQQ g64 for the
  HQQ rows);
* llama.cpp's legacy recipes built with the ``gguf`` package (Q8_0 everywhere; Q5_0 and Q4_0
  linears with a Q8_0 or 16-bit embedding). Q4_1 and Q5_1 reproduce this model's own grid
  (it comes from a Q4_1 GGUF: 4-bit asymmetric groups of 32), so they are shown in separate,
  marked rows and left out of the comparison;
* the search's own knapsack and greedy baselines at the same budget.

Every row's perplexity and KL to the original come from the same evaluation tokens. The
baselines are first screened on ``--screen-tokens``; the full ``--eval-tokens`` evaluation
is spent on the rows that can matter (at some size, within ``--keep`` of the best screened
baseline that fits). ``--screen-tokens 0`` evaluates every row in full. Results are cached
in ``OUT/baselines.json`` and ``OUT/search.json`` so an interrupted run resumes (merged into
``OUT/frontier.json``); the table is printed per size and a
plot is written to ``OUT/frontier.html``. Each size's run directory gets ``frontier.json``,
which ``autocompress report`` shows.

Run: ``.venv/bin/python bench/frontier.py [--sizes 25,30,35,40,50] [--trials 60] [--out bench_out/frontier]``;
on a 2-core machine, two processes (``--part baselines --threads 1`` and ``--part search
--threads 1``) then ``--part table`` to print the merged tables.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from autocompress.artifacts import atomic_write_bytes
from autocompress.compress.apply import block_stats
from autocompress.compress.apply_run import ApplyConfig, apply_run
from autocompress.compress.calibrate import BlockInputs, capture_block_inputs, run_block
from autocompress.compress.code_cache import CODES_DIR, CodeCache
from autocompress.compress.gguf_legacy import gguf_fake_quantize, gguf_tensor_bytes
from autocompress.compress.gptq import gptq_quantize_many
from autocompress.compress.hqq import quantize_hqq
from autocompress.compress.memory import MemoryModel, dense_bytes, stored_bytes
from autocompress.compress.quant_embedding import embedding_unit
from autocompress.compress.quantize import quantize_rtn
from autocompress.compress.saving import load_compressed
from autocompress.data import Split, load_tokens
from autocompress.evaluate import stream_metrics
from autocompress.models import LoadedModel, adapter_for, load_model, model_fingerprint
from autocompress.profile.run import ProfileSettings, profile_run, space_fingerprint
from autocompress.run_calibration import CALIBRATION_FILE, load_calibration
from autocompress.schedule import Choice, QuantMethod, Schedule
from autocompress.search.decisions import to_schedule
from autocompress.search.result import paired_gap
from autocompress.search.space import load_space
from autocompress.search.study import SearchSettings, prepare, search

BITS = (3, 4, 5, 6, 8)
EMBEDDING_BITS = (16, 8, 6)
GRID_ALIGNED = ("Q4_1", "Q5_1")  # this model's own grid: shown, never compared
console = Console()


@dataclass
class Row:
    """One measured model: its name, family, exact bytes as stored and quality."""

    name: str
    family: str
    bytes: int
    ppl: float | None = None
    kl: float | None = None
    tokens: int = 0
    screen_ppl: float | None = None
    aligned: bool = False
    size: str = ""  # for searched/knapsack/greedy rows: the size they were searched for
    window_loss: list[float] | None = None  # per evaluation window, where measured window by window

    @property
    def mib(self) -> float:
        """Size in MiB."""
        return self.bytes / 2**20


# ---------------------------------------------------------------------------------------------
# Baseline weights


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    """Full name -> module of every decoder linear."""
    adapter = adapter_for(model)
    return {f"{adapter.blocks_path}.{i}.{path}": block.get_submodule(path)
            for i, block in enumerate(adapter.blocks(model)) for path in adapter.linears.values()}


@torch.no_grad()
def gptq_codes(model, calibration: torch.Tensor, grids: list[tuple[int, int]]) -> dict[tuple, dict]:
    """GPTQ act-order codes of every decoder linear for each grid, calibrated as ``apply`` does
    (each block on the original model's activations over the run's calibration rows)."""
    adapter = adapter_for(model)
    out: dict[tuple, dict] = {grid: {} for grid in grids}
    inputs = capture_block_inputs(model, calibration, batch_size=4)
    for index, block in enumerate(adapter.blocks(model)):
        stats = block_stats(block, model, inputs, batch_size=4)
        for path in adapter.linears.values():
            weight = block.get_submodule(path).weight
            for grid, q in zip(grids, gptq_quantize_many(weight, stats[path].hessian, grids)):
                out[grid][f"{adapter.blocks_path}.{index}.{path}"] = q
        inputs = inputs.with_hidden(run_block(block, inputs, batch_size=4))
        console.print(f"  GPTQ block {index}", end="\r")
    return out


def uniform_bytes(memory: MemoryModel, model, bits: int, group: int, embedding: int, embedding_group: int) -> int:
    """Exact stored bytes of uniform ``bits``/``group`` linears with the embedding at ``embedding`` bits."""
    schedule = Schedule.uniform(model, Choice(bits=bits, group_size=group), fingerprint="")
    if embedding < 16:
        schedule.units[embedding_unit(model)] = Choice(bits=embedding, group_size=embedding_group)
    return memory.schedule_bytes(schedule)


def gguf_bytes(model, linear_type: str, embedding_type: str | None) -> int:
    """Exact bytes with every decoder linear in ``linear_type`` and the token table in
    ``embedding_type`` (None: 16-bit); everything else 16-bit."""
    total = dense_bytes(model)
    for module in decoder_linears(model).values():
        total += gguf_tensor_bytes(tuple(module.weight.shape), linear_type) - module.weight.numel() * 2
    if embedding_type is not None:
        table = model.get_submodule(embedding_unit(model)).weight
        total += gguf_tensor_bytes(tuple(table.shape), embedding_type) - table.numel() * 2
    return total


class Weights:
    """Puts fake-quantized weights into the model and restores the originals."""

    def __init__(self, model):
        self.model = model
        self.linears = decoder_linears(model)
        self.table = model.get_submodule(embedding_unit(model)).weight
        self.saved = {name: m.weight.detach().clone() for name, m in self.linears.items()}
        self.saved_table = self.table.detach().clone()

    def set(self, linear_weights, table_weight) -> None:
        """``linear_weights``: name -> dense weight (or a function of the original); table likewise."""
        with torch.no_grad():
            for name, module in self.linears.items():
                module.weight.copy_(linear_weights(name, self.saved[name]))
            self.table.copy_(table_weight(self.saved_table))

    def restore(self) -> None:
        """Back to the original weights."""
        with torch.no_grad():
            for name, module in self.linears.items():
                module.weight.copy_(self.saved[name])
            self.table.copy_(self.saved_table)


def table_quantizer(method: str, bits: int):
    """The embedding table's fake quantizer for a baseline row."""
    if bits >= 16:
        return lambda w: w
    if method == "HQQ":
        return lambda w: quantize_hqq(w, bits, 64).dequantize()
    return lambda w: quantize_rtn(w, bits, 128).dequantize()


# ---------------------------------------------------------------------------------------------
# The run


def evaluate(model, tokens, reference) -> dict:
    """Perplexity and KL to ``reference`` on ``tokens`` (512-token windows)."""
    return stream_metrics(model, tokens, window=512, reference=reference, progress=False)


def load_cache(path: Path, key: dict) -> dict[str, Row]:
    """Rows measured by an earlier run with the same settings."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    stored = data.get("key", {})
    if any(stored.get(name) != value for name, value in key.items()):
        return {}
    return {name: Row(**row) for name, row in data["rows"].items()}


def save_cache(path: Path, key: dict, rows: dict[str, Row], extra: dict | None = None) -> None:
    """Write every row so far (atomic)."""
    payload = {"key": key, "rows": {name: asdict(row) for name, row in rows.items()}, **(extra or {})}
    atomic_write_bytes(path, (json.dumps(payload, indent=1) + "\n").encode())


def baseline_plan(model, memory: MemoryModel) -> list[tuple[Row, object, object]]:
    """(row, linear weights function, table weights function) for every baseline recipe."""
    plans = []
    families = [("RTN", 128), ("GPTQ", 128), ("GPTQ", 64), ("HQQ", 64)]
    for method, group in families:
        for bits in BITS:
            for embedding in EMBEDDING_BITS:
                emb_group = 64 if method == "HQQ" else 128
                size = uniform_bytes(memory, model, bits, group, embedding, emb_group)
                name = f"{method} {bits}-bit g{group}, embeddings {embedding}-bit"
                plans.append((Row(name, f"{method} g{group}", size), (method, bits, group), table_quantizer(method, embedding)))
    for linear, embedding in (("Q8_0", "Q8_0"), ("Q5_0", "Q8_0"), ("Q5_0", None), ("Q4_0", "Q8_0"), ("Q4_0", None),
                              ("Q5_1", "Q8_0"), ("Q4_1", "Q8_0")):
        name = f"llama.cpp {linear} linears, embeddings {embedding or '16-bit'}"
        row = Row(name, "llama.cpp", gguf_bytes(model, linear, embedding), aligned=linear in GRID_ALIGNED)
        table = (lambda w, t=embedding: gguf_fake_quantize(w, t)) if embedding else (lambda w: w)
        plans.append((row, ("GGUF", linear), table))
    return plans


def linear_function(spec, gptq: dict):
    """name, original weight -> fake-quantized weight for a baseline spec."""
    if spec[0] == "GGUF":
        return lambda name, w: gguf_fake_quantize(w, spec[1])
    method, bits, group = spec
    if method == "GPTQ":
        return lambda name, w: gptq[(bits, group)][name].dequantize()
    if method == "HQQ":
        return lambda name, w: quantize_hqq(w, bits, group).dequantize()
    return lambda name, w: quantize_rtn(w, bits, group).dequantize()


def wait_for(path: Path, seconds: float = 7200) -> None:
    """Wait until ``path`` exists (another process of this bench writes it)."""
    deadline = time.time() + seconds
    while not path.exists():
        if time.time() > deadline:
            raise SystemExit(f"gave up waiting for {path}")
        time.sleep(10)


def run_baselines(args, model, tokenizer, reference, eval_tokens, run: Path, cache: Path, key: dict,
                  sizes: list[float]) -> None:
    """Measure every baseline recipe (screened, then in full where it can matter) into ``cache``."""
    rows = load_cache(cache, key)
    memory, full = MemoryModel.from_model(model), dense_bytes(model)
    screen_tokens = eval_tokens[: args.screen_tokens] if args.screen_tokens else eval_tokens

    def record(row: Row) -> None:
        rows[row.name] = row
        save_cache(cache, key, rows)

    if "original, 16-bit" not in rows:
        metrics = evaluate(model, eval_tokens, None)
        record(Row("original, 16-bit", "original", full, metrics["perplexity"], 0.0, eval_tokens.numel()))
    console.print(f"original: {full / 2**20:.1f} MiB, perplexity {rows['original, 16-bit'].ppl:.3f}")
    plans = baseline_plan(model, memory)
    # Calibration-free recipes first: the GPTQ rows wait for the run's calibration rows.
    plans.sort(key=lambda plan: plan[1][0] == "GPTQ")
    weights, gptq = Weights(model), None
    limit = max(sizes) / 100 * full
    for row, spec, table in plans:
        if row.name in rows or row.bytes > limit:  # measured already, or larger than every size
            continue
        if spec[0] == "GPTQ" and gptq is None:
            wait_for(run / CALIBRATION_FILE)
            tick = time.perf_counter()
            grids = sorted({(p[1][1], p[1][2]) for p in plans if p[1][0] == "GPTQ"})
            gptq = gptq_codes(model, load_calibration(run).rows, grids)
            console.print(f"GPTQ codes for {len(grids)} grids: {time.perf_counter() - tick:.0f} s")
        weights.set(linear_function(spec, gptq), table)
        # Screening ranks by perplexity alone (no reference pass: half the cost).
        metrics = evaluate(model, screen_tokens, None if args.screen_tokens else reference)
        weights.restore()
        if args.screen_tokens:
            row.screen_ppl = metrics["perplexity"]
        else:
            row.ppl, row.kl, row.tokens = metrics["perplexity"], metrics["kl"], eval_tokens.numel()
        record(row)
        console.print(f"  {row.name}: {row.mib:.1f} MiB, screened perplexity {metrics['perplexity']:.3f}")
    if not args.screen_tokens:
        (args_out(args) / "baselines.done").touch()
        return
    for row, spec, table in plans:
        current = rows.get(row.name)
        if current is None or current.ppl is not None or not worth_full(current, rows, sizes, full, args.keep):
            continue
        if spec[0] == "GPTQ" and gptq is None:
            grids = sorted({(p[1][1], p[1][2]) for p in plans if p[1][0] == "GPTQ"})
            gptq = gptq_codes(model, load_calibration(run).rows, grids)
        weights.set(linear_function(spec, gptq), table)
        metrics = evaluate(model, eval_tokens, reference)
        weights.restore()
        current.ppl, current.kl, current.tokens = metrics["perplexity"], metrics["kl"], eval_tokens.numel()
        record(current)
        console.print(f"  {current.name}: perplexity {current.ppl:.3f} on {current.tokens} tokens")
    (args_out(args) / "baselines.done").touch()


def run_searches(args, model, tokenizer, reference, eval_tokens, run: Path, cache: Path, key: dict,
                 sizes: list[float]) -> None:
    """Profile once, then per size: search, apply, save, load and evaluate; knapsack and greedy too."""
    from autocompress.evaluate import windows  # noqa: PLC0415

    rows = load_cache(cache, key)

    def record(row: Row) -> None:
        rows[row.name] = row
        save_cache(cache, key, rows)

    settings = ProfileSettings(tokens=args.profile_tokens, seq_len=256, roles=False, proxies=False, additivity=False,
                               calib_tokens=args.calib_tokens, calibration=args.calibration)
    tick = time.perf_counter()
    store: dict = {}  # the profile's per-block statistics and GPTQ codes, reused by the searches
    if (run / "profile.json").exists():
        outcome = profile_run(args.model, run, data=args.data, space=args.space, settings=settings)
    else:
        from autocompress.profile.run import choose_calibration, profile_model  # noqa: PLC0415
        from autocompress.run_calibration import save_calibration  # noqa: PLC0415

        loaded = LoadedModel(model, tokenizer, args.model, "alias")
        calibration = choose_calibration(loaded, args.data, settings)
        save_calibration(run, calibration)
        stream = load_tokens(args.data, tokenizer, Split.CALIBRATION, settings.tokens)
        profile = profile_model(loaded, stream, load_space(args.space), settings, model_name=args.model,
                                data_name=args.data, calibration=calibration, stats_store=store,
                                code_cache=CodeCache.for_run(run, model_fingerprint(model), calibration.rows))
        profile.save(run / "profile.json")
    console.print(f"profile: {time.perf_counter() - tick:.0f} s")
    evaluator, on_eval = None, None
    fingerprint = model_fingerprint(model)
    for size in sizes:
        label = f"{size:g}%"
        if all(f"{kind} @ {label}" in rows for kind in ("searched", "knapsack", "greedy")):
            continue
        run_size = args_out(args) / f"size-{size:g}"
        run_size.mkdir(parents=True, exist_ok=True)
        for name in ("profile.json", CALIBRATION_FILE):
            shutil.copyfile(run / name, run_size / name)
        if not (run_size / CODES_DIR).exists():  # the same rows: search and apply read the profile's GPTQ codes
            (run / CODES_DIR).mkdir(exist_ok=True)
            (run_size / CODES_DIR).symlink_to((run / CODES_DIR).resolve(), target_is_directory=True)
        for stale in ("study.db", "study.db-wal", "study.db-shm", "search.json", "schedule.json"):
            (run_size / stale).unlink(missing_ok=True)
        settings_search = SearchSettings(str(run_size), (f"memory={size:g}%",), trials=args.trials,
                                         space=args.space, progress=False, holdout_tokens=args.holdout_tokens,
                                         window=512)
        context = prepare(settings_search, model=model, tokenizer=tokenizer)
        if (args_out(args) / "baselines.done").exists():
            torch.set_num_threads(2)  # the other part has finished: both cores are ours
        if evaluator is None:
            evaluator = context.evaluator
            evaluator.reuse_stats(store)  # RUN_SIZE/codes links to the profile's codes: prepare() found them
            # The same compressed blocks, measured on the evaluation windows: what apply would ship.
            on_eval = evaluator.on(windows(eval_tokens, 512))
        tick = time.perf_counter()
        result = search(settings_search, model=model, tokenizer=tokenizer, evaluator=evaluator)
        console.print(f"search at {label}: {time.perf_counter() - tick:.0f} s, best trial {result.best} "
                      f"({result.trial(result.best).source})")
        best = result.trial(result.best)
        measured = on_eval.measure(best.choices)
        searched_bytes = MemoryModel.from_model(model).schedule_bytes(to_schedule(context.slots, best.choices,
                                                                                  fingerprint))
        record(Row(f"searched @ {label}", "searched", searched_bytes, measured["ppl"], measured["kl"],
                   eval_tokens.numel(), size=label, window_loss=measured["window_loss"]))
        console.print(f"  searched @ {label}: {searched_bytes / 2**20:.2f} MiB, perplexity {measured['ppl']:.3f}")
        if size in args.apply_sizes:
            # The real thing once: apply, save, load, evaluate; it must equal the measured row.
            applied = apply_run(ApplyConfig(run_size, out=run_size / "model", overwrite=True, progress=False))
            compressed, _ = load_compressed(applied.out)
            metrics = evaluate(compressed, eval_tokens, reference)
            record(Row(f"searched, applied and loaded @ {label}", "searched (applied)", stored_bytes(compressed),
                       metrics["perplexity"], metrics["kl"], eval_tokens.numel(), size=label))
            console.print(f"  searched @ {label}, applied, saved and loaded: {stored_bytes(compressed) / 2**20:.2f} "
                          f"MiB, perplexity {metrics['perplexity']:.3f}")
            del compressed
        for source in ("knapsack", "greedy"):
            entry = result.baselines.get(source)  # equal baselines share one trial
            if entry is None or entry.get("trial") is None:
                continue
            trial = result.trial(entry["trial"])
            schedule = to_schedule(context.slots, trial.choices, fingerprint)
            measured = on_eval.measure(trial.choices)
            record(Row(f"{source} @ {label}", source, MemoryModel.from_model(model).schedule_bytes(schedule),
                       measured["ppl"], measured["kl"], eval_tokens.numel(), size=label,
                       window_loss=measured["window_loss"]))
            console.print(f"  {source} @ {label}: perplexity {measured['ppl']:.3f}")


def args_out(args) -> Path:
    """The bench's output directory."""
    return Path(args.out)


def main() -> None:
    """Parse arguments, measure the part asked for, print the tables, write the merged rows and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="stdlib-docs")
    parser.add_argument("--sizes", default="25,30,35,40,50", help="percent of the 16-bit size (default 25,30,35,40,50)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--screen-tokens", type=int, default=4096, help="0: evaluate every baseline in full")
    parser.add_argument("--keep", type=float, default=0.05, help="full evaluation for baselines within this share "
                                                                   "of the best screened one that fits (default 0.05)")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--space", default="default")
    parser.add_argument("--profile-tokens", type=int, default=1024)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--holdout-tokens", type=int, default=4096,
                        help="calibration-split tokens each search trial is measured on (default 4096)")
    parser.add_argument("--calibration", choices=["curated", "first"], default="curated")
    parser.add_argument("--out", default="bench_out/frontier")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--apply-sizes", default="30", help="sizes whose searched schedule is also applied, saved, "
                                                            "loaded and evaluated as a model directory (default 30)")
    parser.add_argument("--part", choices=["all", "baselines", "search", "table"], default="all",
                        help="run one part (two processes with --threads 1 use both cores of a small machine), "
                             "or only print the table of what is measured")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args_out(args)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [float(s) for s in args.sizes.split(",")]
    args.apply_sizes = [float(s) for s in args.apply_sizes.split(",") if s]
    started = time.perf_counter()
    run = out / "run"

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    full = dense_bytes(model)
    # The baselines depend on the evaluation and the calibration rows only; the searches also on the space.
    key = {"model": model_fingerprint(model), "eval_tokens": args.eval_tokens, "screen": args.screen_tokens,
           "calib_tokens": args.calib_tokens, "calibration": args.calibration}
    search_key = {**key, "space": args.space, "space_fingerprint": space_fingerprint(load_space(args.space)),
                  "trials": args.trials, "profile_tokens": args.profile_tokens,
                  "holdout_tokens": args.holdout_tokens}
    if args.part != "table":
        reference = copy.deepcopy(model)
        eval_tokens = load_tokens(args.data, tokenizer, Split.EVALUATION, args.eval_tokens).tokens
        if args.part in ("all", "baselines"):
            run_baselines(args, model, tokenizer, reference, eval_tokens, run, out / "baselines.json", key, sizes)
        if args.part in ("all", "search"):
            run_searches(args, model, tokenizer, reference, eval_tokens, run, out / "search.json", search_key, sizes)
    rows = {**load_cache(out / "baselines.json", key), **load_cache(out / "search.json", search_key)}
    verdicts = print_tables(rows, sizes, full)
    merged = out / "frontier.json"
    save_cache(merged, search_key, rows, {"verdicts": verdicts, "full_bytes": full})
    for size in sizes:
        run_size = out / f"size-{size:g}"
        if run_size.is_dir():
            shutil.copyfile(merged, run_size / "frontier.json")
    write_plot(rows, full, out / "frontier.html")
    console.print(f"wrote {merged} and {out / 'frontier.html'} in {time.perf_counter() - started:.0f} s")


def competitors(rows: dict[str, Row], limit: float) -> list[Row]:
    """Baselines (uniform and llama.cpp recipes, grid-aligned ones left out) of at most ``limit`` bytes."""
    return [r for r in rows.values() if r.family not in ("original", "searched", "searched (applied)", "knapsack", "greedy")
            and not r.aligned and r.bytes <= limit]


def worth_full(row: Row, rows: dict[str, Row], sizes: list[float], full: int, keep: float) -> bool:
    """Whether ``row`` is within ``keep`` of the best screened baseline at some size it fits."""
    for size in sizes:
        limit = size / 100 * full
        if row.bytes > limit or row.aligned:
            continue
        screened = [r.screen_ppl for r in competitors(rows, limit) if r.screen_ppl is not None]
        if screened and row.screen_ppl is not None and row.screen_ppl <= min(screened) * (1 + keep):
            return True
    return False


def print_tables(rows: dict[str, Row], sizes: list[float], full: int) -> dict:
    """One table per size: the searched schedule, knapsack, greedy and the baselines that fit."""
    verdicts = {}
    original = rows.get("original, 16-bit")
    for size in sizes:
        label = f"{size:g}%"
        limit = size / 100 * full
        table = Table(title=f"size {label} of the 16-bit model ({limit / 2**20:.1f} MiB), perplexity on "
                            f"{original.tokens if original else '?'} evaluation tokens")
        for column in ("model", "MiB", "perplexity", "KL", "vs searched", "loss gap (SE)"):
            table.add_column(column, justify="right" if column != "model" else "left")
        ours = rows.get(f"searched @ {label}")
        shown = [r for r in (ours, rows.get(f"searched, applied and loaded @ {label}"), rows.get(f"knapsack @ {label}"),
                             rows.get(f"greedy @ {label}")) if r is not None]
        fitting = sorted(competitors(rows, limit), key=lambda r: (r.ppl is None, r.ppl or r.screen_ppl or 0))
        aligned = [r for r in rows.values() if r.aligned and r.bytes <= limit]
        # A knapsack or greedy row with the searched row's bytes, perplexity and KL is the trial the
        # search kept (it measures both baselines as trials): the same schedule, not a competitor.
        same = [r for r in shown if r.family in ("knapsack", "greedy") and ours
                and (r.bytes, r.ppl, r.kl) == (ours.bytes, ours.ppl, ours.kl)]
        gaps = {r.name: paired_gap(ours.window_loss, r.window_loss) for r in shown if ours and r is not ours}
        for row in shown + fitting[:8] + aligned:
            value = row.ppl if row.ppl is not None else row.screen_ppl
            note = "" if row.ppl is not None else " (screened)"
            ratio = f"{ours.ppl / row.ppl:.3f}" if ours and row.ppl and row is not ours else ""
            name = row.name + (" (grid-aligned: not compared)" if row.aligned else "") + \
                (" (the searched trial)" if row in same else "")
            gap = gaps.get(row.name)
            table.add_row(name, f"{row.mib:.1f}", f"{value:.3f}{note}" if value else "-",
                          f"{row.kl:.4f}" if row.kl is not None else "-", ratio,
                          f"{gap[0]:+.5f} ({gap[1]:.5f})" if gap else "")
        console.print(table)
        measured = [r for r in fitting if r.ppl is not None] + \
            [r for r in shown if r.family in ("knapsack", "greedy") and r not in same]
        best = min(measured, key=lambda r: r.ppl, default=None)
        uniform = [r for r in fitting if r.ppl is not None]
        best_uniform = min(uniform, key=lambda r: r.ppl, default=None)
        verdicts[label] = {
            "paired_loss_gaps": {name: {"mean": gap[0], "se": gap[1]} for name, gap in gaps.items() if gap},
            "searched_ppl": ours.ppl if ours else None, "searched_mib": ours.mib if ours else None,
            "best_baseline": best.name if best else None, "best_baseline_ppl": best.ppl if best else None,
            "beats_all": bool(ours and best and ours.ppl < best.ppl),
            "best_uniform": best_uniform.name if best_uniform else None,
            "gain_over_best_uniform": (1 - ours.ppl / best_uniform.ppl) if ours and best_uniform else None}
        if ours and best:
            console.print(f"{label}: searched {ours.ppl:.3f} vs best baseline {best.name} {best.ppl:.3f} -> "
                          f"{'BEATS' if ours.ppl < best.ppl else 'LOSES TO'} it; "
                          f"gain over the best uniform recipe {verdicts[label]['gain_over_best_uniform']:.1%}")
            gap = gaps.get(best.name)
            if gap:
                console.print(f"  searched minus {best.name}, loss per token paired over the evaluation windows: "
                              f"{gap[0]:+.5f} nats, standard error {gap[1]:.5f} ({abs(gap[0]) / gap[1]:.1f} SE)")
    return verdicts


def write_plot(rows: dict[str, Row], full: int, path: Path) -> None:
    """Size vs perplexity, one trace per family, the searched schedules as a line (plotly HTML)."""
    import plotly.graph_objects as go  # noqa: PLC0415

    fig = go.Figure()
    families: dict[str, list[Row]] = {}
    for row in rows.values():
        if row.ppl is not None or row.screen_ppl is not None:
            families.setdefault(row.family + (" (grid-aligned)" if row.aligned else ""), []).append(row)
    for family, members in families.items():
        members.sort(key=lambda r: r.bytes)
        fig.add_trace(go.Scatter(
            x=[r.mib for r in members], y=[r.ppl if r.ppl is not None else r.screen_ppl for r in members],
            text=[r.name for r in members], name=family,
            mode="lines+markers" if family == "searched" else "markers"))
    fig.update_layout(title="quality per byte (every byte counted)", xaxis_title="size as stored (MiB)",
                      yaxis_title="perplexity", yaxis_type="log")
    atomic_write_bytes(path, fig.to_html(include_plotlyjs="cdn").encode())


if __name__ == "__main__":
    main()
