"""Choosing the calibration windows instead of taking the top of the calibration split.

GPTQ Hessians, Wanda norms and the profiler's measurements are all statistics of the
calibration tokens, so what those tokens are matters as much as how many there are. The
first N windows of a split are a sample of whatever documents happen to come first; the
literature on calibration data for post-training compression finds that the *choice* of the
calibration set moves quantized and pruned quality noticeably, and that two properties help:

* **coverage** of the data's variety (diverse, representative sequences rather than many
  near-duplicates of one kind of text), and
* **hard cases**: windows on which the original model is least sure (highest next-token
  loss), where errors introduced by compression show up first.

:func:`select_calibration` does both on a pool of candidate windows, ``pool_factor`` times
as many as needed, cut from the head of the stream:

1. every candidate is described by its hashed unigram and bigram counts (token ids, so no
   tokenizer is needed), TF-IDF weighted and L2 normalized (for pools of more than
   ``DENSE_POOL`` windows reduced by a truncated SVD);
2. the candidates are clustered with k-means into ``count - n_hard`` clusters and the window
   nearest each centroid is taken (coverage);
3. with a model, the ``n_hard`` remaining candidates with the highest mean next-token loss
   under the original model are added (hard cases).

The rows come back in stream order. :func:`first_rows` is the plain first-N behaviour, and
:func:`calibration_rows` dispatches on a :class:`CalibrationMode`. With the tokenizer's
``bos`` id every row, and every candidate the model scores, starts with BOS (a row of
``seq_len`` text tokens is then ``seq_len + 1`` ids); the n-gram profiles read text tokens only.

Example::

    stream = load_tokens("stdlib-docs", tokenizer, Split.CALIBRATION, 4 * 32 * 512)
    rows = select_calibration(stream.tokens, 32, 512, model=model)      # LongTensor [32, 512]
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import with_bos
from .errors import UserError

HASH_BUCKETS = 1 << 12  # hashed n-gram features per window
DENSE_POOL = 512  # pools up to this many windows are clustered on the full profiles
SVD_COMPONENTS = 128  # dimensions the profiles of a larger pool are reduced to before clustering
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: multiplicative hashing
_BIGRAM = np.uint64(1 << 63)  # marks bigram keys apart from unigram keys


class CalibrationMode(str, Enum):
    """How calibration windows are taken from a token stream."""

    CURATED = "curated"  # coverage clusters plus hard windows (select_calibration)
    FIRST = "first"  # the first windows of the stream (first_rows)


@dataclass(frozen=True)
class CalibrationSelection:
    """What :func:`select_windows` chose, for callers that report on it.

    ``rows`` [count, seq_len] are the chosen windows in stream order (BOS first when the
    selection was given a ``bos`` id: [count, seq_len + 1]) and ``indices`` their
    window numbers (window ``i`` starts at token ``i * seq_len``). ``coverage`` and ``hard``
    split ``indices`` by why each window was taken. ``candidates`` is the size of the pool and
    ``losses`` [candidates] the original model's mean next-token loss per candidate (None
    without a model).
    """

    rows: torch.Tensor
    indices: tuple[int, ...]
    coverage: tuple[int, ...]
    hard: tuple[int, ...]
    candidates: int
    losses: torch.Tensor | None = None


def _stream(tokens) -> torch.Tensor:
    tokens = getattr(tokens, "tokens", tokens)  # a TokenStream is accepted too
    return tokens.reshape(-1).long()


def _check_sizes(available: int, count: int, seq_len: int) -> None:
    if count < 1 or seq_len < 1:
        raise UserError(f"calibration needs at least one row of at least one token (got {count} rows of {seq_len})")
    if available < count * seq_len:
        raise UserError(f"calibration needs {count * seq_len} tokens ({count} rows of {seq_len}); "
                        f"the stream has {available}")


def candidate_windows(tokens: torch.Tensor, count: int, seq_len: int, pool_factor: int = 4) -> torch.Tensor:
    """The candidate pool: non-overlapping windows [n, seq_len] from the first
    ``pool_factor * count * seq_len`` tokens (the whole stream if shorter), ``count <= n``.

    Raises :class:`UserError` when the stream holds fewer than ``count`` windows.
    """
    stream = _stream(tokens)
    _check_sizes(stream.numel(), count, seq_len)
    if pool_factor < 1:
        raise UserError(f"the calibration pool factor must be at least 1 (got {pool_factor})")
    windows = min(pool_factor * count, stream.numel() // seq_len)
    return stream[: windows * seq_len].reshape(windows, seq_len)


def first_rows(tokens: torch.Tensor, count: int, seq_len: int, bos: int | None = None) -> torch.Tensor:
    """The first ``count`` non-overlapping windows of ``seq_len`` tokens, [count, seq_len]
    (BOS first with a ``bos`` id: [count, seq_len + 1]).

    The behaviour before calibration data was chosen. Raises :class:`UserError` when the
    stream holds fewer than ``count`` windows.
    """
    stream = _stream(tokens)
    _check_sizes(stream.numel(), count, seq_len)
    return with_bos(stream[: count * seq_len].reshape(count, seq_len).clone(), bos)


def ngram_profiles(windows: torch.Tensor, buckets: int = HASH_BUCKETS):
    """Hashed unigram + bigram counts of each window's token ids, TF-IDF weighted and L2
    normalized: a sparse matrix [n, buckets] (scipy CSR)."""
    from scipy.sparse import csr_matrix  # noqa: PLC0415
    from sklearn.feature_extraction.text import TfidfTransformer  # noqa: PLC0415

    if buckets < 2 or buckets & (buckets - 1):
        raise ValueError(f"hash buckets must be a power of two (got {buckets})")
    ids = windows.cpu().numpy().astype(np.uint64)
    n, length = ids.shape
    unigrams = ids
    bigrams = (ids[:, :-1] << np.uint64(32)) | ids[:, 1:] | _BIGRAM
    keys = np.concatenate([unigrams, bigrams], axis=1)
    shift = np.uint64(64 - (buckets.bit_length() - 1))
    with np.errstate(over="ignore"):  # the multiplication wraps modulo 2^64 on purpose
        columns = ((keys * _FIBONACCI) >> shift).astype(np.int64)
    rows = np.repeat(np.arange(n), keys.shape[1])
    counts = csr_matrix((np.ones(rows.size, dtype=np.float64), (rows, columns.reshape(-1))), shape=(n, buckets))
    counts.sum_duplicates()
    return TfidfTransformer(norm="l2").fit_transform(counts)


def _embed(profiles, seed: int) -> np.ndarray:
    """The points k-means clusters: the profiles themselves for a pool of up to
    ``DENSE_POOL`` windows; for a larger one, reduced by a truncated SVD (latent semantic
    analysis) and L2 normalized again, which keeps k-means fast. (On a small pool the SVD
    would drop directions that tell windows apart, so it is not used there.)"""
    from sklearn.decomposition import TruncatedSVD  # noqa: PLC0415

    if profiles.shape[0] <= DENSE_POOL:
        return profiles.toarray()
    components = min(SVD_COMPONENTS, profiles.shape[1] - 1)
    reduced = TruncatedSVD(n_components=components, random_state=seed).fit_transform(profiles)
    norms = np.linalg.norm(reduced, axis=1, keepdims=True)
    return reduced / np.where(norms > 0, norms, 1.0)


def coverage_picks(points: np.ndarray, k: int, seed: int = 0) -> list[int]:
    """``k`` distinct row indices of ``points`` [n, d] covering their variety: k-means into ``k``
    clusters, then from each the member nearest its centroid.

    A cluster with no member left to give (duplicate windows make empty or shared clusters)
    is filled by the point farthest from everything taken so far.
    """
    from sklearn.cluster import KMeans  # noqa: PLC0415

    n = points.shape[0]
    if k <= 0:
        return []
    if k >= n:
        return list(range(n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer distinct points than clusters is handled below
        kmeans = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(points)
    distances = kmeans.transform(points)  # [n, k] Euclidean distances to the centroids
    taken: list[int] = []
    chosen = np.zeros(n, dtype=bool)
    for cluster in range(k):
        members = np.flatnonzero(kmeans.labels_ == cluster)
        members = members[~chosen[members]]
        if members.size:
            # Nearest to the centroid; ties go to the earlier window (stable sort).
            best = int(members[np.argsort(distances[members, cluster], kind="stable")[0]])
            taken.append(best)
            chosen[best] = True
    if len(taken) < k:
        gaps = np.full(n, np.inf)
        for index in taken:
            gaps = np.minimum(gaps, np.linalg.norm(points - points[index], axis=1))
        while len(taken) < k:
            gaps[chosen] = -1.0
            best = int(np.argmax(gaps))  # first maximum: deterministic
            taken.append(best)
            chosen[best] = True
            gaps = np.minimum(gaps, np.linalg.norm(points - points[best], axis=1))
    return taken


@torch.no_grad()
def window_losses(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> torch.Tensor:
    """The mean next-token loss (nats) of ``model`` on each window [n, seq_len]: a float tensor [n].

    Runs ``model(input_ids=batch, use_cache=False).logits`` on batches of ``batch_size``.
    """
    device = next(model.parameters()).device
    losses = []
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [b, seq-1]
        losses.append(nll.mean(dim=1).cpu())
    return torch.cat(losses)


def hard_count(count: int, hard_share: float) -> int:
    """How many of ``count`` rows are hard windows: ``hard_share * count`` rounded half up."""
    if not 0.0 <= hard_share <= 1.0:
        raise UserError(f"the share of hard calibration windows must lie in [0, 1] (got {hard_share})")
    return min(count, int(math.floor(hard_share * count + 0.5)))


def select_windows(tokens: torch.Tensor, count: int, seq_len: int, *, model: nn.Module | None = None,
                   pool_factor: int = 4, hard_share: float = 0.25, seed: int = 0,
                   batch_size: int = 4, bos: int | None = None) -> CalibrationSelection:
    """Choose ``count`` calibration windows of ``seq_len`` tokens, with the reasons.

    Same arguments as :func:`select_calibration`, which returns only the rows; this returns a
    :class:`CalibrationSelection` (indices, coverage vs hard windows, candidate losses).
    """
    pool = candidate_windows(tokens, count, seq_len, pool_factor)
    n = pool.shape[0]
    n_hard = hard_count(count, hard_share) if model is not None else 0
    losses = window_losses(model, with_bos(pool, bos), batch_size=batch_size) if n_hard > 0 else None
    if n == count:
        coverage, hard = list(range(n)), []
    else:
        points = _embed(ngram_profiles(pool), seed)
        coverage = coverage_picks(points, count - n_hard, seed)
        hard = []
        if n_hard:
            order = torch.argsort(-losses, stable=True).tolist()  # highest loss first, ties by position
            taken = set(coverage)
            hard = [i for i in order if i not in taken][:n_hard]
    indices = sorted(coverage + hard)
    return CalibrationSelection(
        rows=with_bos(pool[indices].clone(), bos), indices=tuple(indices), coverage=tuple(sorted(coverage)),
        hard=tuple(sorted(hard)), candidates=n, losses=losses,
    )


def select_calibration(tokens: torch.Tensor, count: int, seq_len: int, *, model: nn.Module | None = None,
                       pool_factor: int = 4, hard_share: float = 0.25, seed: int = 0,
                       batch_size: int = 4, bos: int | None = None) -> torch.Tensor:
    """``count`` calibration rows [count, seq_len] (LongTensor) chosen for coverage and difficulty.

    Candidates are the non-overlapping windows of the first ``pool_factor * count * seq_len``
    tokens of ``tokens`` (a 1-D stream or a TokenStream; the whole stream if shorter).
    ``count - n_hard`` windows are the ones nearest the centroids of a k-means clustering of
    their hashed n-gram TF-IDF profiles; with a ``model``, ``n_hard = round(hard_share *
    count)`` more are the remaining candidates with the highest mean next-token loss under it
    (computed without gradients in batches of ``batch_size``); without one, ``n_hard`` is 0.
    Rows come back in stream order; the result depends only on the inputs and ``seed``.
    With the tokenizer's ``bos`` id, the model scores candidates with BOS in front and every
    row starts with it ([count, seq_len + 1]).

    Raises :class:`UserError` when the stream holds fewer than ``count`` windows.
    """
    return select_windows(tokens, count, seq_len, model=model, pool_factor=pool_factor,
                          hard_share=hard_share, seed=seed, batch_size=batch_size, bos=bos).rows


def calibration_rows(mode: CalibrationMode | str, tokens: torch.Tensor, count: int, seq_len: int,
                     model: nn.Module | None = None, seed: int = 0, bos: int | None = None) -> torch.Tensor:
    """``count`` calibration rows [count, seq_len] taken as ``mode`` says: ``curated``
    (:func:`select_calibration`, with ``model`` for the hard windows) or ``first``
    (:func:`first_rows`; ``model`` and ``seed`` are unused). With the tokenizer's ``bos`` id
    every row starts with BOS ([count, seq_len + 1])."""
    try:
        mode = CalibrationMode(mode)
    except ValueError:
        known = ", ".join(m.value for m in CalibrationMode)
        raise UserError(f"unknown calibration mode {mode!r}; known: {known}") from None
    if mode is CalibrationMode.FIRST:
        return first_rows(tokens, count, seq_len, bos)
    return select_calibration(tokens, count, seq_len, model=model, seed=seed, bos=bos)


def pool_tokens(count: int, seq_len: int, mode: CalibrationMode | str = CalibrationMode.CURATED,
                pool_factor: int = 4) -> int:
    """How many stream tokens ``mode`` reads for ``count`` rows of ``seq_len`` (what to load)."""
    factor = pool_factor if CalibrationMode(mode) is CalibrationMode.CURATED else 1
    return factor * count * seq_len
