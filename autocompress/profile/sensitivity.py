"""Measured sensitivity: what changing one unit does to the model's next-token distribution.

The original model is run over the calibration tokens once, block by block, and every
block's input hidden states are kept (:class:`Trace`). Changing block ``i`` then costs only
blocks ``i..end``, the final norm and the output head, never a whole forward pass.

The head is the other big cost (a vocabulary of 49k is ten decoder blocks' worth of
multiply-adds), so the original's predictions are stored in a form that makes the KL cheap
(:class:`OutputReference`): for a linear head ``z = h W^T + b`` and the original's
distribution ``p``,

    KL(p || softmax(z)) = lse(z) - lse(z0) - (h - h0) . (p W)

so the original's logits are never kept, only ``p W`` (one hidden-size vector per token),
its log-normalizer and its final hidden states; each changed run needs one logsumexp per
token, computed in small chunks that stay in cache.

Example::

    trace = trace_model(model, token_rows)
    changed = compress_block(blocks[3], 3, model, Choice(bits=3), trace.block_inputs(3))
    kl, loss_delta = trace.measure_block(3, changed)
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.apply import DroppedBlock
from ..compress.calibrate import BlockInputs, capture_block_inputs, run_block
from ..compress.prune import set_submodule
from ..models import adapter_for

HEAD_CHUNK = 128  # tokens per head matmul: [128, vocab] fp32 logits stay near the cache
VOCAB_SLICE = 8192  # head rows widened to float32 at a time when the model is 16-bit


class OutputReference:
    """The original model's next-token predictions at every scored position, kept compactly.

    Positions are every position of every row but the last one (whose target lies past the
    row), as in :func:`autocompress.evaluate.stream_metrics`.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, final_hidden: torch.Tensor, tokens: torch.Tensor):
        adapter = adapter_for(model)
        self.norm = model.get_submodule(adapter.final_norm)
        self.head = model.get_submodule(adapter.lm_head)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        # The closed form needs logits linear in the hidden state; soft-capped heads (Gemma 2)
        # and quantized heads take the direct path: recompute the original logits per chunk.
        self.linear = self.softcap is None and type(self.head) is nn.Linear
        # Logits and KL in float32 whatever the model's dtype. A 16-bit head is widened a slice
        # of the vocabulary at a time (never a float32 copy of it whole); a float32 one is used as is.
        self.weight = self.head.weight.detach() if self.linear else None
        self.normed = self._normed(final_hidden)
        self.device = self.normed.device
        self.targets = tokens[:, 1:].reshape(-1).to(self.device)
        self.positions = self.normed.shape[0]
        self.lse = torch.empty(self.positions, dtype=torch.float64, device=self.device)
        self.nll = torch.empty(self.positions, dtype=torch.float64, device=self.device)
        # p W per position
        self.expected = torch.empty(self.normed.shape, device=self.device) if self.linear else None
        for chunk in self._chunks():
            logits = self._logits(self.normed[chunk])
            log_probs = F.log_softmax(logits, dim=-1)
            if self.linear:
                # The same formulas as compare(), so an unchanged model gives exactly zero.
                self.lse[chunk] = torch.logsumexp(logits, dim=-1).double()
                target_logit = logits.gather(-1, self.targets[chunk, None]).squeeze(-1).double()
                self.nll[chunk] = self.lse[chunk] - target_logit
                self.expected[chunk] = self._expected(log_probs.exp())
            else:
                self.nll[chunk] = -log_probs.gather(-1, self.targets[chunk, None]).squeeze(-1).double()

    @property
    def loss(self) -> float:
        """The original model's mean next-token loss on these positions."""
        return float(self.nll.mean())

    def _normed(self, final_hidden: torch.Tensor) -> torch.Tensor:
        normed = self.norm(final_hidden)[:, :-1]
        return normed.reshape(-1, normed.shape[-1]).contiguous()

    def _chunks(self):
        for start in range(0, self.positions, HEAD_CHUNK):
            yield slice(start, min(start + HEAD_CHUNK, self.positions))

    def _vocab_slices(self):
        """(vocabulary slice, float32 head rows): the whole head when it is float32, else slices."""
        if self.weight.dtype == torch.float32:
            yield slice(None), self.weight
            return
        for start in range(0, self.weight.shape[0], VOCAB_SLICE):
            rows = slice(start, min(start + VOCAB_SLICE, self.weight.shape[0]))
            yield rows, self.weight[rows].float()

    def _expected(self, probs: torch.Tensor) -> torch.Tensor:
        """p W: the expected head row under ``probs`` [positions, vocab], in float32."""
        expected = None
        for rows, weight in self._vocab_slices():
            part = probs[:, rows] @ weight
            expected = part if expected is None else expected.add_(part)
        return expected

    def _logits(self, normed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.linear:
            normed = normed.float()
            if self.weight.dtype == torch.float32:
                logits = torch.mm(normed, self.weight.t(), out=out)
            else:
                logits = out if out is not None else torch.empty(normed.shape[0], self.weight.shape[0],
                                                                 device=normed.device)
                for rows, weight in self._vocab_slices():
                    logits[:, rows] = torch.mm(normed, weight.t())
            if self.head.bias is not None:
                logits += self.head.bias.float()
            return logits
        logits = self.head(normed).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def compare(self, final_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position KL(original || changed) and changed loss - original loss, both float64."""
        normed = self._normed(final_hidden)
        kl = torch.empty(self.positions, dtype=torch.float64, device=self.device)
        nll = torch.empty(self.positions, dtype=torch.float64, device=self.device)
        buffer = torch.empty(min(HEAD_CHUNK, self.positions), self.head.out_features, device=self.device) \
            if self.linear else None
        for chunk in self._chunks():
            if self.linear:
                rows = chunk.stop - chunk.start
                logits = self._logits(normed[chunk], out=buffer[:rows])
                lse = torch.logsumexp(logits, dim=-1).double()
                shift = ((normed[chunk] - self.normed[chunk]).double() * self.expected[chunk].double()).sum(-1)
                kl[chunk] = lse - self.lse[chunk] - shift
                target_logit = logits.gather(-1, self.targets[chunk, None]).squeeze(-1).double()
                nll[chunk] = lse - target_logit
            else:
                log_probs = F.log_softmax(self._logits(normed[chunk]), dim=-1)
                ref_log_probs = F.log_softmax(self._logits(self.normed[chunk]), dim=-1)
                kl[chunk] = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1).double()
                nll[chunk] = -log_probs.gather(-1, self.targets[chunk, None]).squeeze(-1).double()
        return kl, nll - self.nll


@dataclass
class Trace:
    """The original model's run over the calibration tokens, block by block.

    ``hidden[i]`` is what block ``i`` receives ([rows, seq, hidden]); ``hidden[-1]`` is the
    last block's output. ``kwargs`` are the attention arguments shared by every block.
    """

    model: nn.Module
    tokens: torch.Tensor
    hidden: list[torch.Tensor]
    kwargs: dict
    reference: OutputReference | None
    batch_size: int = 8

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks of the traced model."""
        return adapter_for(self.model).blocks(self.model)

    def block_inputs(self, index: int) -> BlockInputs:
        """The cached inputs of block ``index`` (with its attention arguments)."""
        return BlockInputs(self.hidden[index], self.kwargs)

    @torch.no_grad()
    def run_from(self, index: int, hidden: torch.Tensor, blocks=None) -> torch.Tensor:
        """Final hidden states when ``hidden`` enters block ``index`` (``blocks`` default: the model's)."""
        blocks = self.blocks if blocks is None else blocks
        for j in range(index, len(blocks)):
            if not isinstance(blocks[j], DroppedBlock):
                hidden = run_block(blocks[j], BlockInputs(hidden, self.kwargs), batch_size=self.batch_size)
        return hidden

    @torch.no_grad()
    def measure_block(self, index: int, changed: nn.Module) -> tuple[float, float]:
        """Mean KL and loss delta with block ``index`` replaced by ``changed`` (the rest original)."""
        if isinstance(changed, DroppedBlock):
            out = self.hidden[index]
        else:
            out = run_block(changed, self.block_inputs(index), batch_size=self.batch_size)
        return self.measure_final(self.run_from(index + 1, out))

    def measure_final(self, final_hidden: torch.Tensor) -> tuple[float, float]:
        """Mean KL and loss delta of final hidden states against the original's."""
        kl, delta = self.reference.compare(final_hidden)
        # A change below float32 resolution (a block only rounded to 16 bits, say) can come
        # out a hair under zero; KL itself never is.
        return max(float(kl.mean()), 0.0), float(delta.mean())


@torch.no_grad()
def trace_model(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 8, hook=None,
                reference: bool = True) -> Trace:
    """Run ``model`` over ``tokens`` [rows, seq] block by block, keeping every block's inputs.

    ``hook`` (optional) is called as ``hook(index, block)`` before each block runs and returns
    hook handles, removed once the block has run (the proxies read linear inputs this way).
    ``reference=False`` skips the output head (hidden states only, as the probes need).
    """
    first = capture_block_inputs(model, tokens, batch_size=batch_size)
    hidden = [first.hidden]
    for index, block in enumerate(adapter_for(model).blocks(model)):
        handles = hook(index, block) if hook is not None else []
        try:
            hidden.append(run_block(block, BlockInputs(hidden[-1], first.kwargs), batch_size=batch_size))
        finally:
            for handle in handles:
                handle.remove()
    head = OutputReference(model, hidden[-1], tokens) if reference else None
    return Trace(model, tokens, hidden, first.kwargs, head, batch_size)


@contextmanager
def swapped(block: nn.Module, replacements: dict[str, nn.Module]):
    """Temporarily put ``replacements`` (path inside ``block`` -> module) in ``block``."""
    originals = {path: block.get_submodule(path) for path in replacements}
    try:
        for path, module in replacements.items():
            set_submodule(block, path, module)
        yield block
    finally:
        for path, module in originals.items():
            set_submodule(block, path, module)
