"""Apply a Schedule to a model: prune, then quantize, calibrated block by block.

Calibration is sequential, like Wanda and GPTQ: block i sees the outputs of the already
compressed blocks 0..i-1, so each block's statistics describe the inputs it will really get.
Work is in place, so peak memory stays near one model copy plus one block's activations.

:func:`compress_block` is the same operator on a *copy* of one block, for the profiler.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..models import FamilyAdapter, HeadLayout, adapter_for, config_head_dim
from ..progress import progress_bar
from ..schedule import Choice, Observer, PruneScore, QuantMethod, Schedule, SparsityPattern
from .calibrate import BlockInputs, LinearStats, capture_block_inputs, collect_stats, run_block, token_batch
from .code_cache import CodeCache
from .gguf_linear import GGUFLinear
from .gptq import gptq_quantize, gptq_quantize_many, quantize_observed
from .prune import (channel_scores, drop_blocks, head_group_scores, keep_top, kept_channels, kept_heads,
                    prune_channels, prune_heads, set_submodule, sparsity_mask, weight_scores)
from .quant_embedding import quantize_embeddings_
from .quantize import QuantLinear
from .storage import round_to_storage


class DroppedBlock(nn.Module):
    """Stands in for a removed decoder block: returns its input hidden states unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Identity on the residual stream."""
        return hidden_states


def block_head_layout(block: nn.Module, adapter: FamilyAdapter, config) -> HeadLayout:
    """The head layout of ``block`` read from its weight shapes (pruning included)."""
    head_dim = config_head_dim(config)
    linears = adapter.block_linears(block)
    num_heads = linears["o"].in_features // head_dim
    if "k" in linears:
        num_kv = linears["k"].out_features // head_dim
    else:
        num_kv = (linears["qkv"].out_features - linears["o"].in_features) // (2 * head_dim)
    return HeadLayout(num_heads, num_kv, head_dim)


def heads_to_keep(block: nn.Module, adapter: FamilyAdapter, config, choice: Choice,
                  o_input_sqnorm: torch.Tensor | None) -> tuple[HeadLayout, torch.Tensor] | None:
    """``block``'s head layout and the key/value groups ``choice`` keeps, in index order (None
    when it removes none), scored by :func:`~.prune.head_group_scores`."""
    if choice.drop or choice.head_ratio <= 0:
        return None
    layout = block_head_layout(block, adapter, config)
    target = kept_heads(layout, choice.head_ratio)
    if target.num_kv_heads >= layout.num_kv_heads:
        return None
    o_weight = block.get_submodule(adapter.linears["o"]).weight
    return layout, keep_top(head_group_scores(o_weight, o_input_sqnorm, layout, choice.score), target.num_kv_heads)


def channels_to_keep(block: nn.Module, adapter: FamilyAdapter, choice: Choice,
                     down_input_sqnorm: torch.Tensor | None) -> torch.Tensor | None:
    """The MLP channels of ``block`` that ``choice`` keeps (None when it removes none)."""
    if choice.drop or choice.channel_ratio <= 0:
        return None
    channels = adapter.mlp_channels(block)
    keep = kept_channels(channels, choice.channel_ratio)
    if keep >= channels:
        return None
    down_weight = block.get_submodule(adapter.linears["down"]).weight
    return keep_top(channel_scores(down_weight, down_input_sqnorm, choice.score), keep)


def _needs_norms(choice: Choice, linear_choices: dict[str, Choice]) -> bool:
    structural = (choice.head_ratio > 0 or choice.channel_ratio > 0) and choice.score is PruneScore.WANDA
    return structural or any(c.pattern is not SparsityPattern.NONE and c.score is PruneScore.WANDA
                             for c in linear_choices.values())


# Roles in the order a block runs them; linears of one stage read the same input.
STAGES = (("q", "k", "v", "qkv"), ("o",), ("gate", "up", "gate_up"), ("down",))


def stage_paths(adapter: FamilyAdapter) -> list[list[str]]:
    """The block's linear paths grouped by stage, in execution order."""
    stages = [[adapter.linears[role] for role in roles if role in adapter.linears] for roles in STAGES]
    return [paths for paths in stages if paths]


def _needs_stats(choice: Choice) -> bool:
    """Whether compressing one linear with ``choice`` reads its input statistics (a GGUF type
    weighs its rounding by the inputs' mean square, as llama.cpp's importance matrix does)."""
    return ((choice.quantized and choice.method is QuantMethod.GPTQ) or choice.gguf is not None
            or (choice.pattern is not SparsityPattern.NONE and choice.score is PruneScore.WANDA))


def _gptq_paths(linear_choices: dict[str, Choice]) -> set[str]:
    return {path for path, c in linear_choices.items() if c.quantized and c.method is QuantMethod.GPTQ}


def needs_calibration(choice: Choice, linear_choices: dict[str, Choice]) -> bool:
    """Whether compressing a block with these choices needs activation statistics."""
    return not choice.drop and (_needs_norms(choice, linear_choices) or bool(_gptq_paths(linear_choices))
                                or any(c.gguf is not None for c in linear_choices.values()))


def compress_linear(module: nn.Linear, choice: Choice, stats: LinearStats | None) -> nn.Module:
    """Prune (mask) then quantize one linear layer; returns the module to put in its place."""
    mask = None
    if choice.pattern is not SparsityPattern.NONE:
        sqnorm = stats.sqnorm if stats is not None else None
        mask = sparsity_mask(weight_scores(module.weight, sqnorm, choice.score), choice.pattern, choice.sparsity)
        module.weight.data.masked_fill_(mask, 0.0)
    if not choice.quantized:
        return module
    if choice.gguf is not None:
        return _gguf_linear(module, choice, stats, mask)
    if choice.method is QuantMethod.GPTQ:
        if stats is None or stats.hessian is None:
            raise ValueError("GPTQ needs the layer's Hessian from calibration")
        key = _memo_key(choice.bits, choice.group_size, choice.act_order, choice.observer, module.weight.shape)
        q = stats.memo.get(key) if mask is None else None
        if q is None and mask is None and choice.act_order:
            q = gptq_quantize_many(module.weight, stats.hessian, [(choice.bits, choice.group_size)],
                                   observer=choice.observer.value)[0]
        elif q is None:
            q = gptq_quantize(module.weight, stats.hessian, choice.bits, choice.group_size,
                              act_order=choice.act_order, mask=mask)
        if mask is None:
            stats.memo[key] = q
    else:
        q = quantize_observed(module.weight, choice.bits, choice.group_size, choice.observer.value, mask)
    return QuantLinear.from_quantized(q, module.bias)


def _gguf_linear(module: nn.Linear, choice: Choice, stats: LinearStats | None, mask) -> GGUFLinear:
    """``module`` in ``choice.gguf`` blocks, weighted by its inputs' mean square when ``stats`` has them."""
    importance = stats.sqnorm / max(stats.tokens, 1) if stats is not None else None
    key = ("gguf", choice.gguf, tuple(module.weight.shape))
    blocks = stats.memo.get(key) if stats is not None and mask is None else None
    if blocks is not None:
        linear = GGUFLinear(module.in_features, module.out_features, blocks[0], bias=module.bias is not None,
                            device=module.weight.device, dtype=module.weight.dtype)
        linear.blocks.copy_(blocks[1])
        if module.bias is not None:
            linear.bias.data.copy_(module.bias.detach())
        return linear
    linear = GGUFLinear.from_weight(module.weight, choice.gguf, module.bias, importance)
    if stats is not None and mask is None:
        stats.memo[key] = (linear.gguf_type, linear.blocks.clone())
    return linear


def block_stats(block: nn.Module, model: nn.Module, inputs: BlockInputs, *, batch_size: int = 8,
                choices=(), cache: CodeCache | None = None, index: int | None = None) -> dict[str, LinearStats]:
    """Every linear's input statistics (Wanda norms and GPTQ Hessians) on the *unchanged* block.

    Computed once per block and handed to :func:`compress_block_` as ``stats``, they make every
    choice of the block a pure function of the original weights and these inputs: the profile,
    the search's trials and ``apply`` then produce the very same codes for the same choice.
    The act-order GPTQ codes of ``choices`` are computed up front, in one stacked pass per
    linear (:func:`precompute_gptq`). With a ``cache`` (the run's :class:`~.code_cache.CodeCache`)
    and the block's ``index``, codes already on disk are read instead of computed, and new ones
    are written back.
    """
    from ..host_memory import page_out, trim_host_heap  # noqa: PLC0415

    # Before the largest allocations of a block (Hessians, GPTQ): the model's mapped weights
    # leave memory until touched again, and the heap gives back the block before's tensors.
    page_out(model)
    trim_host_heap()
    adapter = adapter_for(model)
    modules = {path: block.get_submodule(path) for path in adapter.linears.values()}
    stats = collect_stats(block, inputs, modules, set(modules), batch_size=batch_size)
    if cache is None:
        precompute_gptq(block, model, stats, choices)
        return stats
    for path, memo in cache.load(index).items():
        if path in stats:
            stats[path].memo.update(memo)
    known = sum(len(s.memo) for s in stats.values())
    precompute_gptq(block, model, stats, choices)
    if sum(len(s.memo) for s in stats.values()) > known:
        cache.save(index, {path: s.memo for path, s in stats.items()})
    return stats


def _memo_key(bits: int, group_size: int | None, act_order: bool, observer: Observer, shape) -> tuple:
    return (bits, group_size, act_order, observer, tuple(shape))


@torch.no_grad()
def precompute_gptq(block: nn.Module, model: nn.Module, stats: dict[str, LinearStats], choices) -> None:
    """Fill ``stats``' GPTQ memo for every linear of the unchanged ``block`` under each act-order GPTQ
    choice in ``choices``, one stacked pass per linear (:func:`~.gptq.gptq_quantize_many`)."""
    wanted = {(c.observer, c.bits, c.group_size) for choice in choices for c in choice.linear_variants()
              if c.quantized and c.method is QuantMethod.GPTQ and c.act_order}
    for observer in sorted({o for o, _, _ in wanted}, key=str):
        grids = sorted({(b, g) for o, b, g in wanted if o is observer}, key=str)
        for path in adapter_for(model).linears.values():
            weight, linear_stats = block.get_submodule(path).weight, stats[path]
            todo = [(b, g) for b, g in grids if _memo_key(b, g, True, observer, weight.shape) not in linear_stats.memo]
            if not todo or linear_stats.hessian is None:
                continue
            for (bits, group), q in zip(todo, gptq_quantize_many(weight, linear_stats.hessian, todo,
                                                                 observer=observer.value)):
                linear_stats.memo[_memo_key(bits, group, True, observer, weight.shape)] = q


@torch.no_grad()
def compress_block_(block: nn.Module, model: nn.Module, choice: Choice, inputs: BlockInputs | None, *,
                    linear_choices: dict[str, Choice] | None = None, batch_size: int = 8,
                    stats: dict[str, LinearStats] | None = None) -> nn.Module:
    """Compress ``block`` in place (structure first, then masks, then codes); returns it.

    A dropped block returns a :class:`DroppedBlock`. ``linear_choices`` (path inside the
    block -> choice) overrides ``choice`` for single linears. ``inputs`` may be None when
    nothing needs activation statistics. ``stats`` (from :func:`block_stats`) are the original
    block's statistics: with them every linear is compressed against its original inputs and
    nothing is re-collected after earlier stages change (deterministic per choice).
    """
    if choice.drop:
        return DroppedBlock()
    adapter = adapter_for(model)
    linear_choices = {path: (linear_choices or {}).get(path, choice).for_role(role)
                      for role, path in adapter.linears.items()}
    gptq_paths = _gptq_paths(linear_choices)
    fixed = stats is not None
    stats = dict(stats) if fixed else {}
    if not fixed and (_needs_norms(choice, linear_choices) or gptq_paths
                      or any(c.gguf is not None for c in linear_choices.values())):
        if inputs is None:
            raise ValueError("this choice needs calibration inputs (Wanda scores or GPTQ Hessians)")
        modules = {path: block.get_submodule(path) for path in adapter.linears.values()}
        stats = collect_stats(block, inputs, modules, gptq_paths, batch_size=batch_size)

    o_path, down_path = adapter.linears["o"], adapter.linears["down"]
    o_stats = stats.get(o_path)
    heads = heads_to_keep(block, adapter, model.config, choice, o_stats.sqnorm if o_stats else None)
    if heads is not None:
        cols = prune_heads(block, adapter, *heads)
        if o_stats is not None:
            stats[o_path] = o_stats.select(cols)
    down_stats = stats.get(down_path)
    keep = channels_to_keep(block, adapter, choice, down_stats.sqnorm if down_stats else None)
    if keep is not None:
        prune_channels(block, adapter, keep)
        if down_stats is not None:
            stats[down_path] = down_stats.select(keep)

    # Linears are compressed in the order the block runs them; a stage after a changed one
    # re-collects its statistics, so GPTQ (and Wanda) see the inputs the compressed block
    # really produces ("true sequential" in GPTQ's reference code).
    changed = False
    for paths in stage_paths(adapter):
        needy = [path for path in paths if _needs_stats(linear_choices[path])]
        if changed and needy and not fixed:
            modules = {path: block.get_submodule(path) for path in paths}
            fresh = collect_stats(block, inputs, modules, gptq_paths & set(paths), batch_size=batch_size,
                                  stop_early=True)
            stats.update({path: fresh[path] for path in needy})
        for path in paths:
            linear_choice = linear_choices[path]
            set_submodule(block, path, compress_linear(block.get_submodule(path), linear_choice, stats.get(path)))
            changed = changed or linear_choice.quantized or linear_choice.pattern is not SparsityPattern.NONE
    round_to_storage(block)
    return block


def compress_block(block: nn.Module, block_index: int, model: nn.Module, choice: Choice,
                   block_inputs: torch.Tensor | BlockInputs | None = None, *,
                   linear_choices: dict[str, Choice] | None = None, batch_size: int = 8,
                   stats: dict[str, LinearStats] | None = None, **forward_kwargs) -> nn.Module:
    """A compressed copy of one decoder block; ``block`` itself is untouched.

    ``block_inputs`` are the block's cached input hidden states [n, seq, hidden] (or a
    :class:`BlockInputs` from :func:`capture_block_inputs`, which carries the kwargs), and
    ``forward_kwargs`` the other arguments the block's forward needs (attention mask,
    position embeddings...). Inputs are needed only for Wanda scores and GPTQ.

    Example::

        inputs = capture_block_inputs(model, tokens)
        q4 = compress_block(blocks[0], 0, model, Choice(bits=4, method=QuantMethod.GPTQ), inputs)
        q4_out = run_block(q4, inputs)
    """
    del block_index  # the shapes of the block itself are the truth; kept for a stable signature
    if isinstance(block_inputs, torch.Tensor):
        block_inputs = BlockInputs(block_inputs, dict(forward_kwargs))
    elif block_inputs is not None and forward_kwargs:
        block_inputs = BlockInputs(block_inputs.hidden, {**block_inputs.kwargs, **forward_kwargs})
    if choice.drop:
        return DroppedBlock()
    return compress_block_(copy.deepcopy(block), model, choice, block_inputs,
                           linear_choices=linear_choices, batch_size=batch_size, stats=stats)


def _as_token_batch(calibration_tokens, seq_len: int) -> torch.Tensor | None:
    if calibration_tokens is None:
        return None
    tokens = getattr(calibration_tokens, "tokens", calibration_tokens)
    return tokens if tokens.dim() == 2 else token_batch(tokens, seq_len)


@torch.no_grad()
def apply(model: nn.Module, schedule: Schedule, calibration_tokens=None, *, progress: bool = True,
          seq_len: int = 512, batch_size: int = 8, fingerprint: str | None = None,
          sequential: bool = False, cache: CodeCache | None = None) -> nn.Module:
    """Compress ``model`` in place as ``schedule`` says; returns it.

    ``calibration_tokens`` is a LongTensor [n, seq], a 1-D stream (cut into ``seq_len``
    rows) or a :class:`~autocompress.data.TokenStream`; it may be None when no choice needs
    statistics (RTN, magnitude pruning). Blocks are pruned, then quantized, one at a time.
    By default every block is calibrated on the *original* model's activations
    (:func:`block_stats`), exactly as the profile and the search's trials compress it, so the
    shipped model is the one that was measured; ``sequential=True`` calibrates each block on
    the compressed blocks' outputs instead (GPTQ's reference order). Everything not quantized
    ends up rounded to its 16-bit storage type, so the in-memory model equals its saved form.
    ``cache`` (the run's :class:`~.code_cache.CodeCache`, for the same calibration rows) gives
    the GPTQ codes the profile and the search already computed.

    Example::

        schedule = Schedule.uniform(model, Choice(bits=4, group_size=128, method=QuantMethod.GPTQ))
        apply(model, schedule, load_tokens("stdlib-docs", tokenizer).tokens)
    """
    schedule.validate(model, fingerprint=fingerprint)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    paths = list(adapter.linears.values())
    plans = [schedule.block_plan(adapter.blocks_path, i, paths) for i in range(len(blocks))]
    head_choice = schedule.units.get(adapter.lm_head)
    head_calibrated = head_choice is not None and _needs_stats(head_choice)
    needed = [i for i, (choice, linears) in enumerate(plans) if needs_calibration(choice, linears)]
    last_needed = len(blocks) if head_calibrated else (max(needed) if needed else -1)
    tokens = _as_token_batch(calibration_tokens, seq_len)
    if last_needed >= 0 and tokens is None:
        raise ValueError("this schedule needs calibration tokens (Wanda scores or GPTQ Hessians)")
    inputs = capture_block_inputs(model, tokens, batch_size=batch_size) if last_needed >= 0 else None

    dropped = []
    with progress_bar("compressing blocks", len(blocks), progress) as advance:
        for index in range(len(blocks)):
            choice, linears = plans[index]
            block_inputs = inputs if index <= last_needed else None
            stats = None
            if not sequential and block_inputs is not None:
                if needs_calibration(choice, {p: linears.get(p, choice) for p in paths}):
                    stats = block_stats(blocks[index], model, block_inputs, batch_size=batch_size,
                                        choices=[choice, *linears.values()], cache=cache, index=index)
                if index < last_needed:  # the next block is calibrated on the original's outputs
                    inputs = inputs.with_hidden(run_block(blocks[index], inputs, batch_size=batch_size))
            block = compress_block_(blocks[index], model, choice, block_inputs,
                                    linear_choices=linears, batch_size=batch_size, stats=stats)
            if choice.drop:
                dropped.append(index)
            elif sequential and index < last_needed:
                inputs = inputs.with_hidden(run_block(block, inputs, batch_size=batch_size))
            advance()
    # The embedding unit (a tied head with it) and a plain RTN head: quantize_embeddings_;
    # a GPTQ or pruned untied head: _compress_head, with its calibration statistics.
    plain_head = head_choice is not None and _plain_quantization(head_choice)
    if head_choice is not None and head_choice.changes_weights and not plain_head:
        _compress_head(model, adapter, head_choice, inputs if head_calibrated else None, batch_size)
    if dropped:
        drop_blocks(model, dropped)
    quantize_embeddings_(model, schedule.units.get(adapter.embeddings[0]), head_choice if plain_head else None)
    round_to_storage(model)
    return model


def _plain_quantization(choice: Choice) -> bool:
    """Round-to-nearest codes and no pruning: what :func:`.quant_embedding.quantize_embeddings_` does."""
    return choice.quantized and choice.method is QuantMethod.RTN and choice.pattern is SparsityPattern.NONE


def _compress_head(model: nn.Module, adapter: FamilyAdapter, choice: Choice, inputs: BlockInputs | None,
                   batch_size: int) -> None:
    """Compress the output head; a tied head gets its own copy (the embedding stays 16-bit)."""
    head = model.get_submodule(adapter.lm_head)
    untied = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, dtype=head.weight.dtype)
    untied.weight.data.copy_(head.weight.detach())
    if head.bias is not None:
        untied.bias.data.copy_(head.bias.detach())
    stats = None
    if inputs is not None or _needs_norms(choice, {"head": choice}):
        if inputs is None:
            raise ValueError("pruning the output head with Wanda scores needs calibration tokens")
        norm = model.get_submodule(adapter.final_norm)
        final = BlockInputs(run_block(norm, BlockInputs(inputs.hidden), batch_size=batch_size))
        stats = collect_stats(nn.Sequential(untied), final, {"0": untied},
                              {"0"} if choice.method is QuantMethod.GPTQ else set(), batch_size=batch_size)["0"]
    set_submodule(model, adapter.lm_head, compress_linear(untied, choice, stats))
    model.config.tie_word_embeddings = False
