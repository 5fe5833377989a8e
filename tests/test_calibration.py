"""Choosing calibration windows: coverage clusters, hard windows, first-N."""
from __future__ import annotations

import pytest
import torch

from autocompress.calibration import (CalibrationMode, calibration_rows, candidate_windows, first_rows,
                                      select_calibration, select_windows, window_losses)
from autocompress.compress.tiny_models import tiny_model
from autocompress.errors import UserError

SEQ = 16
VOCAB = 256  # the tiny models' vocabulary


def uniform_stream(tokens: int, seed: int = 0, low: int = 0, high: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (tokens,), generator=generator)


def two_halves(count: int, pool_factor: int = 4, first_share: float = 0.9) -> tuple[torch.Tensor, int]:
    """A stream of ``pool_factor * count`` windows: the first 90% from ids [0, 30), the rest from
    [150, 180) (no token in common); returns it and the first window of the second part."""
    windows = pool_factor * count
    split = round(first_share * windows)
    first = uniform_stream(split * SEQ, seed=1, low=0, high=30)
    second = uniform_stream((windows - split) * SEQ, seed=2, low=150, high=180)
    return torch.cat([first, second]), split


def window_index(stream: torch.Tensor, row: torch.Tensor) -> int:
    """The index of the aligned window of ``stream`` equal to ``row`` (fails if none is)."""
    windows = stream[: stream.numel() // SEQ * SEQ].view(-1, SEQ)
    matches = (windows == row).all(dim=1).nonzero().flatten().tolist()
    assert matches, "a returned row is not an aligned window of the stream"
    return matches[0]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model("llama", hidden=32, layers=2, intermediate=64)


def test_shape_dtype_and_determinism():
    stream = uniform_stream(64 * SEQ)
    rows = select_calibration(stream, 8, SEQ, seed=3)
    assert rows.shape == (8, SEQ) and rows.dtype == torch.long
    assert torch.equal(rows, select_calibration(stream, 8, SEQ, seed=3))
    first = first_rows(stream, 8, SEQ)
    assert first.shape == (8, SEQ) and first.dtype == torch.long
    assert torch.equal(first, stream[: 8 * SEQ].view(8, SEQ))


def test_rows_are_distinct_aligned_windows_of_the_pool_in_stream_order(model):
    stream = uniform_stream(100 * SEQ + 5, seed=4)
    selection = select_windows(stream, 8, SEQ, model=model, seed=1)
    assert selection.candidates == 32  # pool_factor 4 * count 8, although the stream holds 100 windows
    indices = [window_index(stream, row) for row in selection.rows]
    assert indices == list(selection.indices)
    assert indices == sorted(set(indices)) and len(indices) == 8
    assert max(indices) < selection.candidates
    assert len(selection.hard) == 2 and len(selection.coverage) == 6  # round(0.25 * 8)
    assert not set(selection.hard) & set(selection.coverage)


def test_curated_rows_cover_a_small_different_part_that_first_n_misses():
    count = 8
    stream, split = two_halves(count)
    curated = calibration_rows("curated", stream, count, SEQ)
    first = calibration_rows(CalibrationMode.FIRST, stream, count, SEQ)
    curated_at = [window_index(stream, row) for row in curated]
    first_at = [window_index(stream, row) for row in first]
    assert any(i < split for i in curated_at) and any(i >= split for i in curated_at)
    assert all(i < split for i in first_at)


def test_hard_windows_have_the_highest_losses_among_those_not_taken(model):
    stream = uniform_stream(48 * SEQ, seed=5)
    selection = select_windows(stream, 12, SEQ, model=model, batch_size=5)
    losses = selection.losses
    assert losses is not None and losses.shape == (selection.candidates,)
    pool = candidate_windows(stream, 12, SEQ)
    assert torch.allclose(losses, window_losses(model, pool, batch_size=7), atol=1e-5)
    hard = list(selection.hard)
    assert len(hard) == 3
    assert losses[hard].mean() > losses.mean()
    left = [i for i in range(selection.candidates) if i not in selection.indices]
    assert losses[hard].min() >= losses[left].max()


def test_without_a_model_every_row_is_a_coverage_pick():
    stream = uniform_stream(40 * SEQ, seed=6)
    selection = select_windows(stream, 10, SEQ)
    assert selection.hard == () and selection.losses is None and len(selection.coverage) == 10


def test_a_short_stream_uses_all_of_it_and_too_short_a_stream_is_an_error():
    stream = uniform_stream(5 * SEQ + 3)
    assert torch.equal(select_calibration(stream, 5, SEQ), stream[: 5 * SEQ].view(5, SEQ))
    assert select_calibration(uniform_stream(7 * SEQ), 5, SEQ).shape == (5, SEQ)
    for call in (select_calibration, first_rows):
        with pytest.raises(UserError, match=f"needs {6 * SEQ} tokens") as raised:
            call(stream, 6, SEQ)
        assert "\n" not in str(raised.value)


def test_duplicate_windows_still_give_distinct_rows():
    window = uniform_stream(SEQ, seed=7)
    stream = torch.cat([window.repeat(30), uniform_stream(2 * SEQ, seed=8)])
    indices = select_windows(stream, 8, SEQ).indices
    assert len(set(indices)) == 8
    assert {30, 31} <= set(indices)  # the two different windows are both covered


def test_unknown_mode_is_a_user_error():
    with pytest.raises(UserError, match="curated, first"):
        calibration_rows("random", uniform_stream(4 * SEQ), 2, SEQ)
