"""The search's final choice: lowest measured KL, unless a tie within the noise has lower perplexity."""
from __future__ import annotations

import math

import pytest

from autocompress.search.collect import choose_best, kl_gap
from autocompress.search.result import TrialRecord


def _record(number: int, windows: list[float] | None, loss: float, source: str = "tpe") -> TrialRecord:
    kl = sum(windows) / len(windows) if windows else 0.01 * (number + 1)
    return TrialRecord(number=number, source=source, choices={}, predicted_kl=kl, corrected_kl=None, measured_kl=kl,
                       measured_loss=loss, measured_ppl=math.exp(loss), memory_bytes=1, avg_bits=4.0, params=1,
                       latency_ms=1.0, latency_source="roofline:h100", feasible=True, state="COMPLETE",
                       window_kl=windows)


def test_kl_gap_is_the_paired_mean_and_standard_error():
    best = _record(0, [1.0, 2.0, 3.0, 4.0], 3.0)
    other = _record(1, [1.5, 2.0, 3.5, 4.0], 3.0)
    mean, error = kl_gap(other, best)
    assert mean == pytest.approx(0.25)
    assert error == pytest.approx(math.sqrt(1 / 12) / 2)  # stdev of (.5, 0, .5, 0) over sqrt(4)
    assert kl_gap(_record(2, None, 3.0), best) is None
    assert kl_gap(_record(3, [1.0, 2.0], 3.0), best) is None  # other windows: no pairing


def test_a_clearly_lower_kl_is_kept_whatever_the_perplexity():
    lowest = _record(0, [0.10, 0.20, 0.30, 0.40], 3.30)
    worse = _record(1, [0.20, 0.31, 0.39, 0.51], 3.20)  # higher in every window: no tie
    best, note = choose_best([worse, lowest], z=2.0)
    assert best is lowest and note is None


def test_a_tie_within_the_noise_goes_to_the_lower_perplexity():
    lowest = _record(0, [0.10, 0.20, 0.30, 0.40], 3.30, source="local")
    tied = _record(4, [0.14, 0.16, 0.34, 0.37], 3.29, source="knapsack")  # +0.0025 on average, +-0.02
    far = _record(5, [0.30, 0.40, 0.50, 0.60], 3.00)  # lowest perplexity, but clearly higher KL
    best, note = choose_best([lowest, tied, far], z=2.0)
    assert best is tied
    assert "trial 4 (knapsack) kept over the lowest-KL trial 0 (local)" in note
    assert choose_best([lowest, tied, far], z=0.0) == (lowest, None)


def test_records_without_window_figures_keep_the_lowest_kl():
    lowest = _record(0, None, 3.3)
    other = _record(1, None, 3.0)
    assert choose_best([other, lowest], z=2.0) == (lowest, None)
