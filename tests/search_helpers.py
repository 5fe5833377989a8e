"""Tiny runs for the search tests: a saved tiny model, and a profile measured with block swapping."""
from __future__ import annotations

from pathlib import Path

import torch

from autocompress.data import load_tokens
from autocompress.evaluate import windows
from autocompress.models import load_model, model_fingerprint
from autocompress.profile.artifact import Profile, UnitProfile
from autocompress.search.decisions import build_slots
from autocompress.search.measure import SwapEvaluator
from autocompress.search.space import load_space

PROFILE_TOKENS = 512


def make_run(tmp: Path, tokenizer, space: str = "default", family: str = "llama", layers: int | None = None) -> Path:
    """RUN/ with a saved tiny model and a profile.json whose KLs were measured one unit at a time."""
    from tiny import tiny_model

    model = tiny_model(family)
    model_dir = tmp / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    loaded = load_model(str(model_dir))
    model = loaded.model
    search_space = load_space(space)
    calibration = load_tokens("stdlib-docs", tokenizer, "calibration", PROFILE_TOKENS).tokens
    slots = build_slots(search_space, model)
    evaluator = SwapEvaluator(model, slots, windows(calibration, 128), windows(calibration, 128))
    units = []
    untouched = {s.name: "bits=16" for s in slots}
    for index, slot in enumerate(slots):
        kl, loss = {}, {}
        base = evaluator.original_quality()["loss"]
        for label, _ in search_space.probe_choices():
            option = "drop" if label == "drop" else (label if label.startswith("bits=") else f"bits=16+{label}")
            measured = evaluator.measure({**untouched, slot.name: option})
            kl[label], loss[label] = measured["kl"], measured["loss"] - base
        units.append(UnitProfile(name=slot.members[0], block=slot.block, kl=kl, loss_delta=loss))
    profile = Profile(model=str(model_dir), model_fingerprint=model_fingerprint(model), data="stdlib-docs",
                      data_fingerprint="test", space=search_space.name, space_fingerprint="test",
                      granularity=search_space.granularity.value, calibration_tokens=PROFILE_TOKENS,
                      base_loss=evaluator.original_quality()["loss"],
                      choices={label: c.to_json() for label, c in search_space.probe_choices()}, units=units)
    run = tmp / "run"
    profile.save(run / "profile.json")
    return run
