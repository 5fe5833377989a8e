"""Knowledge-distillation recovery: the original model teaches its compressed copy.

The loss, on calibration text, is the one Minitron and DistilBERT use:

* KL(teacher || student) on the next-token distributions, both softened by a temperature
  ``T`` and scaled by ``T**2`` (so its gradients keep their size as ``T`` changes);
* plus ``hidden_weight`` times the MSE between the student's and the teacher's hidden
  states after a few chosen blocks, each divided by the teacher's mean square there, so
  every chosen depth weighs the same whatever the scale of its residual stream.

What trains: the dense weights left inside the decoder blocks (pruned linears and the
untouched ones), the norms, and low-rank adapters on every quantized linear
(:mod:`~autocompress.compress.lora`, QLoRA-style: packed codes frozen). Embeddings and the
output head stay frozen (tied, large, and not what compression damaged). Training is
bounded by a step count and by seconds, whichever comes first.

Example::

    teacher = copy.deepcopy(model)
    apply(model, schedule, tokens)
    result = distill(model, teacher, token_batch(tokens, 256), DistillConfig(steps=200))
    merge_lora(model, "requantize")
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import adapter_for
from ..progress import progress_bar
from .lora import LoRAQuantLinear, add_lora, lora_modules
from .storage import round_to_storage


@dataclass(frozen=True)
class DistillConfig:
    """Settings of one distillation run.

    ``hidden_layers`` are block indices whose outputs are matched (None: about every
    quarter of the depth and the last block). ``lora_rank`` 0 trains no adapters;
    ``lora_alpha`` None means alpha = 2 * rank. Temperature 1 (Minitron's choice) distills
    exactly the distribution perplexity is measured on.
    """

    steps: int = 200
    seconds: float | None = None
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 5e-5
    lora_lr: float = 1e-3
    weight_decay: float = 0.0
    temperature: float = 1.0
    hidden_weight: float = 1.0
    hidden_layers: tuple[int, ...] | None = None
    lora_rank: int = 8
    lora_alpha: float | None = None
    train_dense: bool = True
    train_norms: bool = True
    seed: int = 0

    def to_json(self) -> dict:
        """Plain-dict form (for artifacts)."""
        data = asdict(self)
        data["hidden_layers"] = list(self.hidden_layers) if self.hidden_layers is not None else None
        return data


@dataclass
class DistillResult:
    """What one distillation run did: steps, seconds, the loss curve and what it trained."""

    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    trained_parameters: int = 0
    lora_parameters: int = 0

    @property
    def first_loss(self) -> float | None:
        """Loss of the first step (None if no step ran)."""
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        """Mean loss of the last tenth of the steps (None if no step ran)."""
        if not self.losses:
            return None
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)

    def to_json(self) -> dict:
        """Plain-dict form (the loss curve thinned to at most 50 points)."""
        stride = max(1, len(self.losses) // 50)
        return {"steps": self.steps, "seconds": round(self.seconds, 2), "first_loss": self.first_loss,
                "last_loss": self.last_loss, "losses": [round(v, 5) for v in self.losses[::stride]],
                "trained_parameters": self.trained_parameters, "lora_parameters": self.lora_parameters}


def default_hidden_layers(num_blocks: int) -> tuple[int, ...]:
    """About every quarter of the depth, and the last block."""
    picks = {max(0, round(num_blocks * f) - 1) for f in (0.25, 0.5, 0.75, 1.0)}
    return tuple(sorted(picks))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            student_hidden: list[torch.Tensor] = (), teacher_hidden: list[torch.Tensor] = (),
            hidden_weight: float = 0.0, hidden_from: int = 0) -> tuple[torch.Tensor, float, float]:
    """The distillation loss; returns (loss, logit KL part, hidden MSE part).

    KL is averaged over token positions, ``T**2``-scaled; each hidden MSE is relative to the
    teacher's mean square at that depth, over the positions from ``hidden_from`` on (1 leaves
    out a BOS position, whose hidden states in many models are outliers that would swamp the
    mean square; no position predicts BOS, so the KL needs no such care).
    """
    t = temperature
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / t, dim=-1)
    r = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / t, dim=-1)
    kl = F.kl_div(s, r, log_target=True, reduction="sum") / s.shape[0] * (t * t)
    mse = student_logits.new_zeros((), dtype=torch.float32)
    for hs, ht in zip(student_hidden, teacher_hidden):
        if hidden_from:
            hs, ht = hs[:, hidden_from:], ht[:, hidden_from:]
        mse = mse + F.mse_loss(hs.float(), ht.float()) / ht.float().pow(2).mean().clamp(min=1e-12)
    if student_hidden:
        mse = mse / len(student_hidden)
    loss = kl + hidden_weight * mse if student_hidden and hidden_weight else kl
    return loss, float(kl.detach()), float(mse.detach())


class _HiddenTaps:
    """Forward hooks recording the outputs of chosen decoder blocks (works for dropped blocks too)."""

    def __init__(self, model: nn.Module, indices: tuple[int, ...]):
        blocks = adapter_for(model).blocks(model)
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [blocks[i].register_forward_hook(self._hook(i)) for i in indices if i < len(blocks)]
        self.indices = [i for i in indices if i < len(blocks)]

    def _hook(self, index: int):
        def hook(module, args, output):
            self.outputs[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def take(self) -> list[torch.Tensor]:
        values = [self.outputs[i] for i in self.indices]
        self.outputs = {}
        return values

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def trainable_parameters(model: nn.Module, config: DistillConfig) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Mark what trains (see the module docstring); returns (dense and norm params, adapter params)."""
    model.requires_grad_(False)
    dense: list[nn.Parameter] = []
    adapters: list[nn.Parameter] = []
    for block in adapter_for(model).blocks(model):
        for module in block.modules():
            if isinstance(module, LoRAQuantLinear):
                adapters += [module.lora_a, module.lora_b]
            elif isinstance(module, nn.Linear) and config.train_dense:
                dense += [p for p in (module.weight, module.bias) if p is not None]
            elif _is_norm(module) and config.train_norms:
                dense += list(module.parameters(recurse=False))
    for param in dense + adapters:
        param.requires_grad_(True)
    return dense, adapters


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch.to(next(model.parameters()).device), use_cache=False).logits


def distill(student: nn.Module, teacher: nn.Module, tokens: torch.Tensor, config: DistillConfig, *,
            progress: bool = True, add_adapters: bool = True,
            before_step: Callable[[int, int], None] | None = None, bos: bool = False) -> DistillResult:
    """Train ``student`` to match ``teacher`` on ``tokens`` [n, seq] for ``config.steps`` steps.

    Adds LoRA adapters to the student's quantized linears first (``config.lora_rank`` > 0 and
    ``add_adapters``); they stay in place afterwards, for :func:`~autocompress.compress.lora.merge_lora`.
    Trained dense weights are rounded to their 16-bit storage type at the end, so the model
    equals its saved form. Both models must have the same block count (dropped blocks stand
    in place as identities while staging). ``before_step(i, steps)`` runs before step ``i``
    (fading uses it to lower its scale). ``bos``: every row starts with a BOS token, which
    ``config.seq_len`` does not count and the hidden-state loss leaves out.
    """
    if tokens.dim() != 2:
        raise ValueError("distill needs token rows [n, seq]")
    if config.seq_len + bos < tokens.shape[1]:
        tokens = tokens[:, : config.seq_len + bos]
    if add_adapters and config.lora_rank > 0:
        add_lora(student, config.lora_rank, config.lora_alpha, seed=config.seed)
    dense, adapters = trainable_parameters(student, config)
    groups = [g for g in ({"params": dense, "lr": config.lr}, {"params": adapters, "lr": config.lora_lr})
              if g["params"]]
    result = DistillResult(0, 0.0, trained_parameters=sum(p.numel() for p in dense),
                           lora_parameters=sum(p.numel() for p in adapters))
    if not groups or config.steps <= 0:
        student.requires_grad_(False)
        return result
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    num_blocks = len(adapter_for(student).blocks(student))
    layers = config.hidden_layers if config.hidden_layers is not None else default_hidden_layers(num_blocks)
    layers = tuple(layers) if config.hidden_weight > 0 else ()
    student_taps, teacher_taps = _HiddenTaps(student, layers), _HiddenTaps(teacher, layers)
    generator = torch.Generator().manual_seed(config.seed)
    # eval(): no dropout; gradients flow all the same.
    student.eval()
    teacher.eval()
    start = time.perf_counter()
    try:
        with progress_bar("distilling", config.steps, progress) as advance:
            for index in range(config.steps):
                if before_step is not None:
                    before_step(index, config.steps)
                if config.seconds is not None and time.perf_counter() - start >= config.seconds:
                    break
                rows = torch.randint(0, tokens.shape[0], (config.batch_size,), generator=generator)
                batch = tokens[rows]
                with torch.no_grad():
                    teacher_logits = _logits(teacher, batch)
                    teacher_hidden = [h.detach() for h in teacher_taps.take()]
                student_logits = _logits(student, batch)
                loss, _, _ = kd_loss(student_logits, teacher_logits, config.temperature, student_taps.take(),
                                     teacher_hidden, config.hidden_weight, hidden_from=int(bos))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                result.losses.append(float(loss.detach()))
                result.steps += 1
                advance()
    finally:
        student_taps.close()
        teacher_taps.close()
        student.requires_grad_(False)
        optimizer.zero_grad(set_to_none=True)
    result.seconds = time.perf_counter() - start
    _round_trained(student)
    return result


@torch.no_grad()
def _round_trained(model: nn.Module) -> None:
    """Round trained 16-bit-stored tensors to storage precision (adapters stay fp32 until merged)."""
    adapters = {id(p): p.data.clone() for m in lora_modules(model) for p in (m.lora_a, m.lora_b)}
    for block in adapter_for(model).blocks(model):
        round_to_storage(block)
    for m in lora_modules(model):
        for p in (m.lora_a, m.lora_b):
            p.data.copy_(adapters[id(p)])


@torch.no_grad()
def kd_eval_loss(student: nn.Module, teacher: nn.Module, tokens: torch.Tensor, config: DistillConfig, *,
                 bos: bool = False) -> float:
    """The distillation loss of ``student`` on ``tokens`` [n, seq] (no training), averaged over
    rows; ``bos`` as in :func:`distill`."""
    num_blocks = len(adapter_for(student).blocks(student))
    layers = config.hidden_layers if config.hidden_layers is not None else default_hidden_layers(num_blocks)
    layers = tuple(layers) if config.hidden_weight > 0 else ()
    student_taps, teacher_taps = _HiddenTaps(student, layers), _HiddenTaps(teacher, layers)
    total, count = 0.0, 0
    try:
        for start in range(0, tokens.shape[0], config.batch_size):
            batch = tokens[start:start + config.batch_size, : config.seq_len + bos]
            teacher_logits = _logits(teacher, batch)
            teacher_hidden = teacher_taps.take()
            loss, _, _ = kd_loss(_logits(student, batch), teacher_logits, config.temperature,
                                 student_taps.take(), teacher_hidden, config.hidden_weight, hidden_from=int(bos))
            total += float(loss) * batch.shape[0]
            count += batch.shape[0]
    finally:
        student_taps.close()
        teacher_taps.close()
    return total / count
