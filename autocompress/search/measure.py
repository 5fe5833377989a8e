"""Measure a candidate for real without copying the model: swap compressed blocks in, run, swap back.

Each (block, option) is compressed when a trial first needs it, with
:func:`~autocompress.compress.apply.compress_block` (a compressed copy of the original
block, calibrated by the block's statistics on the original activations, exactly as
``apply`` compresses it). Compressed blocks and block statistics stay in a cache bounded in
bytes (``max_bytes``, by default half the model's 16-bit size, see :func:`default_cache_bytes`):
past it, statistics leave first, then the least recently used blocks, and both are computed
again, to the same numbers, when a later trial needs them (GPTQ codes come back from the run's
code cache). A trial puts the cached blocks into the model's ``ModuleList``, runs one forward
pass over the held-aside windows, and restores the original blocks, so the model is never
deep-copied and a trial costs one forward pass.

The reference is the original model's next-token distribution on the same windows, computed
once (kept in 16 bits). Wanda scores and GPTQ Hessians use each block's inputs from the
*original* model on calibration tokens (not the held-aside slice).

Example::

    evaluator = SwapEvaluator(model, slots, holdout, calibration)
    evaluator.measure(picks, report=lambda step, kl: False)   # {"kl", "loss", "ppl", "window_kl", ...}
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.apply import block_stats, compress_block, needs_calibration
from ..compress.calibrate import BlockInputs, capture_block_inputs, run_block
from ..compress.code_cache import CodeCache
from ..compress.prune import set_submodule
from ..compress.quant_embedding import embedding_replacements
from ..models import adapter_for
from ..schedule import Choice
from .byte_cache import ByteLRU, default_cache_bytes, tensor_bytes
from .decisions import Slot


class Pruned(Exception):
    """Raised by :meth:`SwapEvaluator.measure` when ``report`` asks to stop early."""

    def __init__(self, step: int, kl: float):
        super().__init__(f"stopped after window batch {step} at KL {kl:.4g}")
        self.step, self.kl = step, kl


class SwapEvaluator:
    """Quality of slot picks on held-aside windows, by swapping cached compressed blocks."""

    def __init__(self, model: nn.Module, slots: list[Slot], holdout: torch.Tensor, calibration: torch.Tensor | None,
                 *, batch_size: int = 2, max_bytes: int | None = None, code_cache: CodeCache | None = None):
        self.model = model
        self.slots = slots
        self.adapter = adapter_for(model)
        self.blocks = self.adapter.blocks(model)
        self.originals = list(self.blocks)
        self.device = next(model.parameters()).device
        self.holdout = holdout.to(self.device)  # [windows, window], on the model's device
        self.calibration = calibration  # [rows, seq] or None
        self.batch_size = batch_size
        self.code_cache = code_cache  # the run's GPTQ codes on disk, for these calibration rows
        # Compressed blocks and embedding replacements, reused from trial to trial, and block
        # statistics, needed only to compress a block (transient): one byte budget for all.
        self.cache = ByteLRU(default_cache_bytes(model) if max_bytes is None else max_bytes)
        self.compressions = 0
        self.stats_computed = 0
        self._inputs: list[BlockInputs] | None = None
        self._slots_of_block: dict[int, list[Slot]] = {}
        for slot in slots:
            self._slots_of_block.setdefault(slot.block, []).append(slot)
        self.reference = [F.log_softmax(self._logits(batch), -1).to(torch.float16) for batch in self._batches()]

    def _batches(self):
        return self.holdout.split(self.batch_size)

    @torch.no_grad()
    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        # float32 whatever the model's dtype: KL and loss are accumulated in float32.
        return self.model(input_ids=batch, use_cache=False).logits[:, :-1].float()

    def _block_inputs(self, index: int) -> BlockInputs:
        if self._inputs is None:
            if self.calibration is None:
                raise ValueError("this search space needs calibration tokens (Wanda scores or GPTQ)")
            inputs = capture_block_inputs(self.model, self.calibration, batch_size=self.batch_size)
            self._inputs = []
            for block in self.originals:
                self._inputs.append(inputs)
                inputs = inputs.with_hidden(run_block(block, inputs, batch_size=self.batch_size))
        return self._inputs[index]

    def on(self, holdout: torch.Tensor) -> SwapEvaluator:
        """An evaluator of the same slots on other windows that shares this one's compressed
        blocks, statistics and calibration inputs (e.g. the evaluation split, for what ships)."""
        other = SwapEvaluator(self.model, self.slots, holdout, self.calibration, batch_size=self.batch_size,
                              max_bytes=self.cache.max_bytes, code_cache=self.code_cache)
        other.cache, other._inputs = self.cache, self._inputs
        return other

    def reuse_stats(self, store: dict[int, dict]) -> None:
        """Take blocks' statistics and GPTQ codes computed elsewhere on the same calibration rows
        and the same original activations (a profile in this process: ``profile_model(stats_store=)``)."""
        for index, stats in store.items():
            self.cache.put(("stats", index), stats, tensor_bytes(stats), transient=True)

    def _block_stats(self, index: int) -> dict:
        """Block ``index``'s statistics on the original activations (see ``block_stats``), kept
        while the byte budget allows and computed again, to the same numbers, when it did not."""
        stats = self.cache.get(("stats", index))
        if stats is None:
            choices = [option.choice for slot in self._slots_of_block.get(index, []) for option in slot.options]
            stats = block_stats(self.originals[index], self.model, self._block_inputs(index),
                                batch_size=self.batch_size, choices=choices, cache=self.code_cache, index=index)
            self.stats_computed += 1
            self.cache.put(("stats", index), stats, tensor_bytes(stats), transient=True)
        return stats

    def _plan(self, index: int, picks: dict[str, str]) -> tuple[Choice, dict[str, Choice]] | None:
        """The block's (choice, linear overrides), or None when it stays as it is."""
        prefix = f"{self.adapter.blocks_path}.{index}"
        choice, linears = Choice(), {}
        for slot in self._slots_of_block.get(index, []):
            option = slot.option(picks[slot.name])
            for member in slot.members:
                if member == prefix:
                    choice = option.choice
                else:
                    linears[member[len(prefix) + 1:]] = option.choice
        linears = {p: c for p, c in linears.items() if c != Choice()}
        if choice == Choice() and not linears:
            return None
        return choice, linears

    def compressed(self, index: int, choice: Choice, linears: dict[str, Choice]) -> nn.Module:
        """Block ``index`` compressed as planned (cached; compressed at most once while cached)."""
        key = ("block", index, choice, tuple(sorted(linears.items(), key=lambda kv: kv[0])))
        block = self.cache.get(key)
        if block is not None:
            return block
        full = {p: linears.get(p, choice) for p in self.adapter.linears.values()}
        inputs = self._block_inputs(index) if needs_calibration(choice, full) else None
        stats = self._block_stats(index) if inputs is not None else None
        block = compress_block(self.originals[index], index, self.model, choice, inputs,
                               linear_choices=linears or None, batch_size=self.batch_size, stats=stats)
        self.compressions += 1
        self.cache.put(key, block, tensor_bytes(block, _storages(self.originals[index])))
        return block

    def replacements(self, unit: str, choice: Choice) -> dict[str, nn.Module]:
        """The quantized embedding (with a tied head) or untied head modules of ``unit`` (cached)."""
        key = ("unit", unit, choice)
        modules = self.cache.get(key)
        if modules is None:
            modules = embedding_replacements(self.model, unit, choice)
            self.compressions += 1
            self.cache.put(key, modules, tensor_bytes(modules, _storages(self.model)))
        return modules

    @torch.no_grad()
    def measure(self, picks: dict[str, str], report: Callable[[int, float], bool] | None = None) -> dict[str, float]:
        """KL(original || candidate), loss and perplexity on the held-aside windows, and each
        window's own mean KL and loss (``window_kl``, ``window_loss``: trials measured on the same
        windows compare pairwise).

        ``report(step, running_kl)`` is called after each batch of windows; returning True
        stops the measurement (raises :class:`Pruned`).
        """
        swapped = {}
        for index in range(len(self.originals)):
            plan = self._plan(index, picks)
            if plan is not None:
                swapped[index] = self.compressed(index, *plan)
        outside = {}  # path -> module for the embedding and head slots
        for slot in self._slots_of_block.get(-1, []):
            option = slot.option(picks[slot.name])
            if option.choice.quantized:
                outside.update(self.replacements(slot.name, option.choice))
        kept = {path: self.model.get_submodule(path) for path in outside}
        try:
            for path, module in outside.items():
                set_submodule(self.model, path, module)
            for index, block in swapped.items():
                self.blocks[index] = block
            kl_sum, nll_sum, count = 0.0, 0.0, 0
            window_kl, window_loss = [], []
            for step, (batch, reference) in enumerate(zip(self._batches(), self.reference)):
                log_probs = F.log_softmax(self._logits(batch), -1)
                targets = batch[:, 1:]
                nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)  # per window
                kl = F.kl_div(log_probs, reference.float(), log_target=True, reduction="none").sum((-1, -2))
                window_kl += (kl / targets.shape[1]).tolist()
                window_loss += (nll / targets.shape[1]).tolist()
                nll_sum += nll.sum().item()
                kl_sum += kl.sum().item()
                count += targets.numel()
                if report is not None and report(step, kl_sum / count):
                    raise Pruned(step, kl_sum / count)
        finally:
            for index in swapped:
                self.blocks[index] = self.originals[index]
            for path, module in kept.items():
                set_submodule(self.model, path, module)
        loss = nll_sum / count
        return {"kl": kl_sum / count, "loss": loss, "ppl": float(torch.tensor(loss).exp()),
                "window_kl": window_kl, "window_loss": window_loss}

    @torch.no_grad()
    def original_quality(self) -> dict[str, float]:
        """Loss and perplexity of the untouched model on the held-aside windows."""
        nll_sum, count = 0.0, 0
        for batch, reference in zip(self._batches(), self.reference):
            targets = batch[:, 1:]
            nll_sum += -reference.float().gather(-1, targets.unsqueeze(-1)).sum().item()
            count += targets.numel()
        loss = nll_sum / count
        return {"loss": loss, "ppl": float(torch.tensor(loss).exp())}


def _storages(module: nn.Module) -> frozenset[int]:
    # A compressed copy shares what it left alone (norms, 16-bit linears) with the original.
    return frozenset(t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()])
