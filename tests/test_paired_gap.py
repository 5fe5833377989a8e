"""Paired comparisons of two models measured on the same windows (trials' ``window_kl``, the frontier's rows)."""
from __future__ import annotations

import math

import pytest

from autocompress.search.result import paired_gap


def test_paired_gap_is_the_mean_and_standard_error_of_the_differences():
    mean, error = paired_gap([1.5, 2.0, 3.5, 4.0], [1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(0.25)
    assert error == pytest.approx(math.sqrt(1 / 12) / 2)  # stdev of (.5, 0, .5, 0) over sqrt(4)
    # a constant shift is certain: no spread, however small the shift
    assert paired_gap([1.1, 2.1, 3.1], [1.0, 2.0, 3.0]) == (pytest.approx(0.1), pytest.approx(0.0, abs=1e-12))


@pytest.mark.parametrize("values, reference", [(None, [1.0, 2.0]), ([1.0, 2.0], None), ([1.0, 2.0], [1.0, 2.0, 3.0]),
                                               ([1.0], [2.0]), ([], [])])
def test_paired_gap_needs_the_same_windows_and_two_of_them(values, reference):
    assert paired_gap(values, reference) is None
