"""A search is a function of its seed: two processes with the same --seed propose the same trials."""
from __future__ import annotations

import subprocess
import sys

from autocompress.search.result import SearchResult


def _trials(run_dir, tmp_path, name: str, seed: int) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "autocompress", "search", str(run_dir), "--budget", "memory=45%",
                           "--holdout-tokens", "1024", "--window", "128", "--calibration-tokens", "512",
                           "--threads", "1", "--no-progress", "--measure", "6", "--trials", "16", "--seed", str(seed),
                           "--storage", f"sqlite:///{tmp_path}/{name}.db"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [t.choices for t in SearchResult.load(run_dir / "search.json").trials]


def test_same_seed_same_trials_in_separate_processes(tmp_path, tokenizer):
    from search_helpers import make_run

    run_dir = make_run(tmp_path, tokenizer)
    first = _trials(run_dir, tmp_path, "a", seed=3)
    second = _trials(run_dir, tmp_path, "b", seed=3)
    assert len(first) == 16
    # local moves (two trials in three after the baselines) drew from the process id before
    assert first == second
