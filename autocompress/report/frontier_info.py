"""Where a run's model sits on the quality-per-byte frontier, as plain data for the report.

``bench/frontier.py`` measures the recipes a user would otherwise pick (uniform RTN, GPTQ
and HQQ, llama.cpp's legacy types) with every byte counted and writes ``frontier.json``
into each run directory it searched. The report plots those rows by size and perplexity and
marks this run's own model (its ``eval.json``). Beside it: how the search's predicted KL
compares with the KL measured on the held-aside slice and with the final evaluation's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class FrontierPoint:
    """One measured model: name, family, bytes as stored, perplexity (None: not measured in full)."""

    name: str
    family: str
    bytes: int
    perplexity: float
    aligned: bool = False


@dataclass
class FrontierInfo:
    """Every frontier row, this run's own point, and the frontier's evaluation size."""

    points: list[FrontierPoint] = field(default_factory=list)
    own: FrontierPoint | None = None
    tokens: int | None = None


def read_frontier(run_dir: Path) -> dict | None:
    """``RUN/frontier.json`` as written by ``bench/frontier.py``, or None when absent or unreadable."""
    path = Path(run_dir) / "frontier.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("rows"), dict) else None


def frontier_info(frontier: dict | None, evaluation: dict | None) -> FrontierInfo | None:
    """The frontier's fully measured rows plus this run's ``eval.json`` point (None without either)."""
    if frontier is None and evaluation is None:
        return None
    info = FrontierInfo()
    for row in (frontier or {}).get("rows", {}).values():
        if not isinstance(row, dict) or row.get("ppl") is None:
            continue
        info.points.append(FrontierPoint(str(row.get("name")), str(row.get("family")), int(row.get("bytes", 0)),
                                         float(row["ppl"]), bool(row.get("aligned", False))))
        info.tokens = info.tokens or row.get("tokens")
    if evaluation and evaluation.get("perplexity") is not None and evaluation.get("size_bytes"):
        info.own = FrontierPoint("this run", "this run", int(evaluation["size_bytes"]),
                                 float(evaluation["perplexity"]))
    return info


def prediction_gap_rows(schedule_meta: dict, evaluation: dict | None) -> list[tuple[str, str]]:
    """Predicted KL (additive, corrected), KL measured on the held-aside slice, and the final KL."""
    search = (schedule_meta or {}).get("search", {})
    rows = []
    for key, text in (("predicted_kl", "predicted by the additive profile model"),
                      ("corrected_kl", "predicted after the learned correction"),
                      ("measured_kl", "measured on the held-aside calibration slice")):
        if search.get(key) is not None:
            rows.append((text, f"{search[key]:.4g}"))
    if evaluation and evaluation.get("kl") is not None:
        rows.append((f"final: the saved model on {evaluation.get('tokens', '?')} evaluation tokens",
                     f"{evaluation['kl']:.4g}"))
    return rows
