"""Transfer between tiny random models of different families, depths and widths.

For each pair: profile the source (block granularity, the ``quant-only`` space, calibration text
sampled from the source itself), allocate a schedule at the size of uniform 3-bit, transfer it to
the target with no profile of the target (plain, and checked: the transfer and six exchanges of
it measured on 512 other sampled tokens of the target), and compare with uniform 3-bit there:
bytes against the limit, whether any block could still go one bit width up, and perplexity and
KL on text sampled from the target's own 16-bit distribution (on random weights that is the text
perplexity means something on: its log is the entropy plus the KL to the 16-bit model).

Run: ``.venv/bin/python bench/transfer_tiny.py [--seeds 0,1,2]``
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from autocompress.compress.apply import apply  # noqa: E402
from autocompress.compress.memory import MemoryModel  # noqa: E402
from autocompress.compress.tiny_models import sampled_tokens, tiny_model  # noqa: E402
from autocompress.evaluate import stream_metrics  # noqa: E402
from autocompress.models import LoadedModel  # noqa: E402
from autocompress.profile.run import ProfileSettings, profile_model  # noqa: E402
from autocompress.schedule import Schedule  # noqa: E402
from autocompress.search.budget import Budget  # noqa: E402
from autocompress.search.space import load_space  # noqa: E402
from autocompress.transfer import describe, repair, transfer_schedule  # noqa: E402
from autocompress.transfer.coordinates import model_coordinates  # noqa: E402
from autocompress.transfer.repair import no_upgrade_fits  # noqa: E402
from autocompress.transfer.sensitivity import from_profile  # noqa: E402

# (family, blocks, hidden, MLP width) of source and target
PAIRS = [(("llama", 4, 96, 160), ("qwen2", 6, 96, 160)),
         (("llama", 4, 96, 160), ("phi3", 8, 128, 256)),
         (("qwen2", 6, 96, 160), ("llama", 3, 96, 160)),
         (("phi3", 5, 96, 160), ("opt", 7, 128, 192)),
         (("gpt2", 6, 96, 160), ("llama", 4, 64, 128))]


def model_of(spec, seed: int):
    """A tiny random model whose next-token distributions have a shape: the families that tie the
    head to the embedding (Llama, OPT, GPT-2 here) would otherwise predict almost uniformly
    (perplexity near the vocabulary size, KL of any quantization ~0.01) from the embedding's
    small initial scale, so the embedding gets the scale of the other matrices."""
    family, blocks, hidden, intermediate = spec
    model = tiny_model(family, layers=blocks, hidden=hidden, intermediate=intermediate, seed=seed)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.08, generator=torch.Generator().manual_seed(seed))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the target's weights")
    parser.add_argument("--length", type=int, default=96, help="tokens per sampled row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    space = load_space("quant-only")
    settings = ProfileSettings(tokens=512, seq_len=64, roles=False, additivity=False, progress=False)
    table = Table(title="tiny models: transfer (no target profile) vs uniform 3-bit of the same size")
    for column in ("source", "target", "seed", "bytes / limit", "exact", "bits (transfer)", "bits (checked)",
                   "ppl uniform", "ppl transfer", "ppl checked", "KL uniform", "KL transfer", "KL checked"):
        table.add_column(column, justify="right")
    wins = {"transfer": 0, "checked": 0}
    total = 0
    for source_spec, target_spec in PAIRS:
        source = model_of(source_spec, seed=100)
        profile = profile_model(LoadedModel(source, None, "tiny-" + source_spec[0], "hub"),
                                sampled_tokens(source, 8, 64, seed=1), space, settings)
        uniform = Schedule.uniform(source, space.quant_choice(3))
        memory = MemoryModel.from_model(source)
        budget = Budget.parse([f"memory={memory.schedule_bytes(uniform)}b"], memory)
        allocated = describe(repair(uniform, source, budget, space,
                                    from_profile(profile, model_coordinates(source))), source, profile)
        for seed in (int(s) for s in args.seeds.split(",")):
            target = model_of(target_spec, seed=seed)
            target_memory = MemoryModel.from_model(target)
            uniform_t = Schedule.uniform(target, space.quant_choice(3))
            limit = target_memory.schedule_bytes(uniform_t)
            target_budget = Budget.parse([f"memory={limit}b"], target_memory)
            transferred = transfer_schedule(allocated, target, target_budget, space=space)
            checked = transfer_schedule(allocated, target, target_budget, space=space,
                                        check_tokens=sampled_tokens(target, 8, 64, seed=2000 + seed))
            text = sampled_tokens(target, 8, args.length, seed=1000 + seed)
            row = {}
            for name, schedule in (("uniform", uniform_t), ("transfer", transferred), ("checked", checked)):
                metrics = stream_metrics(apply(copy.deepcopy(target), schedule, progress=False), text,
                                         window=args.length, batch_size=8, reference=target, progress=False)
                row[name] = (metrics["perplexity"], metrics["kl"])
            exact = all(no_upgrade_fits(s, target_budget, space, space.units(target)) and
                        target_memory.schedule_bytes(s) <= limit for s in (transferred, checked))
            for name in wins:
                wins[name] += row[name][0] < row["uniform"][0]
            total += 1
            table.add_row("{} {}x{}".format(*source_spec[:3]), "{} {}x{}".format(*target_spec[:3]), str(seed),
                          f"{target_memory.schedule_bytes(transferred):,} / {limit:,}", "yes" if exact else "NO",
                          *(" ".join(str(s.units[u].bits) for u in space.units(target)) for s in (transferred, checked)),
                          *(f"{row[n][0]:.2f}" for n in ("uniform", "transfer", "checked")),
                          *(f"{row[n][1]:.4f}" for n in ("uniform", "transfer", "checked")))
    console = Console(width=220)
    console.print(table)
    console.print(f"perplexity below uniform's: transfer in {wins['transfer']} of {total} cases, "
                  f"checked transfer in {wins['checked']} of {total}")


if __name__ == "__main__":
    main()
