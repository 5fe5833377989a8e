"""Shadow scoring: the original model reads the candidate's prompt and completion and says how
far the candidate's next-token distributions were from its own.

Per completion token: KL(original || candidate) in nats, top-1 agreement (both models' most
likely token is the same) and the log-probability of the token the candidate emitted under
the original. Each score is the mean over the completion's tokens.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ShadowJob:
    """A finished candidate completion to score: its token ids and the candidate's log-probs.

    ``logprobs`` is ``[len(completion), vocab]``: row i is the candidate's distribution that
    chose ``completion[i]``. ``sink`` receives the score dict (or ``{"error": message}``).
    """

    prompt: list[int]
    completion: list[int]
    logprobs: torch.Tensor
    sink: object


def forward_kwargs(model: nn.Module) -> set[str]:
    """Names the model's ``forward`` accepts (position ids, the cache argument, logits_to_keep)."""
    return set(inspect.signature(model.forward).parameters)


def compare(original: torch.Tensor, candidate: torch.Tensor, completion: list[int]) -> dict:
    """Scores of one completion from both models' log-probs (``[tokens, vocab]`` each)."""
    original = original.float()
    candidate = candidate.float()
    kl = (original.exp() * (original - candidate)).sum(-1).clamp(min=0)  # rounding makes tiny negatives
    agreement = (original.argmax(-1) == candidate.argmax(-1)).float()
    emitted = original.gather(-1, torch.tensor(completion).view(-1, 1)).squeeze(-1)
    return {"kl": round(float(kl.mean()), 6), "agreement": round(float(agreement.mean()), 6),
            "logprob": round(float(emitted.mean()), 6),
            "tokens": len(completion)}


def score_batch(model: nn.Module, jobs: list[ShadowJob]) -> list[dict]:
    """Run ``model`` once over every job's prompt + completion (left-padded) and score each job."""
    accepted = forward_kwargs(model)
    rows = [job.prompt + job.completion[:-1] for job in jobs]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if "position_ids" in accepted:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    longest = max(len(job.completion) for job in jobs)
    if "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = longest
    logits = model(**kwargs).logits[:, -longest:]
    scores = []
    for i, job in enumerate(jobs):
        count = len(job.completion)
        mine = torch.log_softmax(logits[i, longest - count:].float(), dim=-1)
        scores.append(compare(mine, job.logprobs, job.completion))
    return scores
