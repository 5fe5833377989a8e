"""Block-by-block calibration: capture a block's inputs, run it alone, collect linear statistics.

Like Wanda and GPTQ, only one block's activations are alive at a time: the model is run up to
block 0 once (a forward pre-hook records what block 0 receives and stops the forward), then
each block is run on the cached hidden states with the attention arguments HF built for it
(causal mask, rotary position embeddings, position ids).

Example::

    inputs = capture_block_inputs(model, token_batch)     # token_batch: LongTensor [n, seq]
    out = run_block(adapter.blocks(model)[0], inputs)       # hidden states after block 0
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..data import with_bos
from ..models import adapter_for


@dataclass
class BlockInputs:
    """Cached inputs of one block: hidden states [n, seq, hidden] and the other forward kwargs.

    ``kwargs`` are the same for every sequence (no padding: every row has the same positions),
    so they are stored for a batch of one and broadcast.
    """

    hidden: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    def with_hidden(self, hidden: torch.Tensor) -> BlockInputs:
        """The same kwargs with other hidden states (the next block's inputs)."""
        return replace(self, hidden=hidden)


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


def token_batch(tokens: torch.Tensor, seq_len: int, count: int | None = None, bos: int | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into ``count`` (default: all that fit) rows of ``seq_len``; with a
    ``bos`` id each row starts with it ([rows, seq_len + 1], see :mod:`autocompress.data`)."""
    rows = tokens.numel() // seq_len
    if count is not None:
        rows = min(rows, count)
    if rows == 0:
        raise ValueError(f"{tokens.numel()} tokens are fewer than one sequence of {seq_len}")
    return with_bos(tokens[: rows * seq_len].reshape(rows, seq_len), bos)


def _batch_one(value):
    """Reduce a captured kwarg to batch size 1 where it has a batch dimension."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] > 1:
        return value[:1]
    if isinstance(value, tuple):
        return tuple(_batch_one(v) for v in value)
    return value


# Cache-related arguments are dropped: calibration runs every block once, without a cache.
_DROPPED_KWARGS = {"past_key_values", "past_key_value", "layer_past", "use_cache", "cache_position",
                   "output_attentions", "encoder_hidden_states", "encoder_attention_mask"}


@torch.no_grad()
def capture_block_inputs(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 8) -> BlockInputs:
    """What block 0 of ``model`` receives for ``tokens`` [n, seq] (all rows the same length).

    Returns the hidden states [n, seq, hidden] and the keyword arguments (attention mask,
    position embeddings, position ids...) the model passes to its decoder blocks.
    """
    adapter = adapter_for(model)
    first = adapter.blocks(model)[0]
    signature = inspect.signature(first.forward)
    hidden_parts: list[torch.Tensor] = []
    captured: dict = {}

    def hook(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        hidden_name = next(iter(signature.parameters))
        hidden_parts.append(arguments.pop(hidden_name).detach())
        if not captured:
            captured.update({k: _batch_one(v) for k, v in arguments.items() if k not in _DROPPED_KWARGS})
        raise _StopForward

    device = next(model.parameters()).device
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, tokens.shape[0], batch_size):
            try:
                model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return BlockInputs(torch.cat(hidden_parts), captured)


def block_output(result) -> torch.Tensor:
    """The hidden states from a decoder block's return value (a tensor or a tuple)."""
    return result[0] if isinstance(result, (tuple, list)) else result


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, *, batch_size: int = 8) -> torch.Tensor:
    """Run ``block`` on cached ``inputs`` batch by batch; returns its hidden states [n, seq, hidden]."""
    outputs = []
    for start in range(0, inputs.hidden.shape[0], batch_size):
        outputs.append(block_output(block(inputs.hidden[start:start + batch_size], **inputs.kwargs)))
    return torch.cat(outputs)


@dataclass
class LinearStats:
    """Statistics of one linear layer's input over the calibration tokens.

    ``sqnorm`` [K] is the sum over tokens of x_j^2 (Wanda's ||x_j||_2 squared); ``hessian``
    [K, K] is GPTQ's 2 X^T X / n when requested.
    """

    sqnorm: torch.Tensor
    hessian: torch.Tensor | None
    tokens: int
    # GPTQ results already computed from this Hessian: (bits, group, act_order, weight shape) -> codes.
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def select(self, cols: torch.Tensor) -> LinearStats:
        """The statistics of a subset of input columns (after structured pruning)."""
        hessian = self.hessian[cols][:, cols] if self.hessian is not None else None
        return LinearStats(self.sqnorm[cols], hessian, self.tokens)


@torch.no_grad()
def collect_stats(block: nn.Module, inputs: BlockInputs, linears: dict[str, nn.Module],
                  hessians: set[str] | frozenset[str] = frozenset(), *, batch_size: int = 8,
                  stop_early: bool = False) -> dict[str, LinearStats]:
    """Run ``block`` on ``inputs`` with hooks on ``linears`` (path -> module) and gather stats.

    Linears that see the very same input tensor (q/k/v, gate/up) share one accumulation.
    ``stop_early`` ends each batch's forward once every linear has run (the rest of the
    block's output is not needed).
    """
    sums: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    alias: dict[str, str] = {}
    # Holding each seen input alive keeps its address from being reused within a batch.
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}

    def needs_gram(owner: str) -> bool:
        return any(alias.get(p, owner) == owner for p in hessians)

    def make_hook(path: str):
        def hook(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            if path not in alias:
                alias[path] = seen.setdefault(key, (path, x))[0]
            else:
                seen.setdefault(key, (alias[path], x))
            owner = alias[path]
            if owner != path:
                return
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            sums[path] = sums.get(path, 0) + flat.pow(2).sum(dim=0)
            counts[path] = counts.get(path, 0) + flat.shape[0]
            if needs_gram(path):
                grams[path] = grams.get(path, 0) + flat.t() @ flat
        return hook

    done: set[str] = set()

    def make_stop(path: str):
        def hook(module, args, output):
            done.add(path)
            if len(done) == len(linears):
                raise _StopForward
        return hook

    handles = [module.register_forward_pre_hook(make_hook(path)) for path, module in linears.items()]
    if stop_early:
        handles += [module.register_forward_hook(make_stop(path)) for path, module in linears.items()]
    try:
        for start in range(0, inputs.hidden.shape[0], batch_size):
            seen.clear()
            done.clear()
            try:
                block(inputs.hidden[start:start + batch_size], **inputs.kwargs)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    stats = {}
    for path in linears:
        owner = alias[path]
        gram = grams.get(owner)
        # GPTQ's Hessian of the layer-wise squared error is 2 X^T X / n.
        hessian = 2.0 * gram / counts[owner] if (path in hessians and gram is not None) else None
        stats[path] = LinearStats(sums[owner], hessian, counts[owner])
    return stats
