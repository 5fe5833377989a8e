"""Tiny runs for the search tests: a saved tiny model, its calibration rows, and a profile
measured with block swapping (embedding and head units too, when the space has them)."""
from __future__ import annotations

from pathlib import Path

import torch

from autocompress.data import bos_id, load_tokens
from autocompress.evaluate import windows
from autocompress.models import load_model, model_fingerprint
from autocompress.profile.artifact import Profile, UnitProfile
from autocompress.search.decisions import build_slots
from autocompress.search.measure import SwapEvaluator
from autocompress.run_calibration import CalibrationSet, save_calibration
from autocompress.search.space import SearchSpace, load_space

PROFILE_TOKENS = 512


def make_run(tmp: Path, tokenizer, space: str | SearchSpace = "default", family: str = "llama",
             layers: int | None = None) -> Path:
    """RUN/ with a saved tiny model, RUN/calibration.safetensors and a profile.json whose KLs were
    measured one unit at a time, with the search's own evaluator (so measured = searched).

    ``space`` is a built-in name, a YAML path or a SearchSpace; a search of a space that is not
    built in must name it again (``SearchSettings(space=...)``)."""
    from tiny import tiny_model

    model = tiny_model(family)
    model_dir = tmp / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    loaded = load_model(str(model_dir))
    model = loaded.model
    search_space = space if isinstance(space, SearchSpace) else load_space(space)
    calibration = load_tokens("stdlib-docs", tokenizer, "calibration", PROFILE_TOKENS).tokens
    rows = windows(calibration, 128, bos_id(tokenizer))  # BOS first when the tokenizer adds it
    slots = build_slots(search_space, model)
    evaluator = SwapEvaluator(model, slots, rows, rows)
    units, extra = [], []
    untouched = {s.name: "embed:bits=16" if s.block < 0 else "bits=16" for s in slots}
    base = evaluator.original_quality()["loss"]
    for slot in slots:
        if slot.block < 0:  # the token embedding (with a tied head) or an untied head
            labels = [(label, label) for label, _ in search_space.embedding_choices()]
        else:
            labels = [(label, "drop" if label == "drop" else label if label.startswith("bits=") else f"bits=16+{label}")
                      for label, _ in search_space.probe_choices()]
        kl, loss = {}, {}
        for label, option in labels:
            measured = evaluator.measure({**untouched, slot.name: option})
            kl[label], loss[label] = measured["kl"], measured["loss"] - base
        unit = UnitProfile(name=slot.members[0], block=slot.block, kl=kl, loss_delta=loss)
        if slot.block < 0:
            unit.role = "head" if slot.name.endswith("lm_head") else "embedding"
        (extra if slot.block < 0 else units).append(unit)
    run = tmp / "run"
    calibration_set = CalibrationSet(rows, "first", PROFILE_TOKENS)
    save_calibration(run, calibration_set)
    choices = search_space.probe_choices() + search_space.embedding_choices()
    profile = Profile(model=str(model_dir), model_fingerprint=model_fingerprint(model), data="stdlib-docs",
                      data_fingerprint="test", space=search_space.name, space_fingerprint="test",
                      granularity=search_space.granularity.value, calibration_tokens=PROFILE_TOKENS,
                      base_loss=base, choices={label: c.to_json() for label, c in choices}, units=units,
                      extra_units=extra, meta={"calibration": calibration_set.describe()})
    profile.save(run / "profile.json")
    return run
