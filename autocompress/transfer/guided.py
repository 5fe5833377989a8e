"""Predictor-guided profiling: measure only the units the sensitivity predictor is unsure of.

``autocompress profile MODEL --predict PREDICTOR_OR_PROFILES`` calls :func:`guided_profile_run`:
the predictor (a saved JSON, or trained on the spot from ``profile.json`` files) ranks the
model's units by the spread of its trees, the profiler measures the most uncertain share
(first and last block always), and the other units get the predictor's KL, put on the measured
units' level. The profile says which units were predicted (``meta["predicted_units"]``), so
nothing downstream mistakes a guess for a measurement.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from ..errors import UserError
from .predictor import SensitivityPredictor, predicted_kl, select_units_to_measure


def load_predictor(spec: str) -> SensitivityPredictor:
    """A predictor from a saved JSON, or trained on comma-separated ``profile.json`` files / run dirs."""
    from ..profile.artifact import Profile  # noqa: PLC0415

    paths = [Path(p.strip()) for p in spec.split(",") if p.strip()]
    if not paths:
        raise UserError("--predict needs a predictor JSON or one or more profile.json files")
    if len(paths) == 1 and paths[0].is_file():
        try:
            return SensitivityPredictor.load(paths[0])
        except UserError:
            pass  # not a predictor: read it as a profile below
    profiles = []
    for path in paths:
        path = path / "profile.json" if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"{path}: not found; --predict takes a predictor JSON or profile.json files")
        profiles.append(Profile.load(path))
    return SensitivityPredictor.from_profiles(profiles)


def guided_profile(loaded, stream, space, settings, predictor: SensitivityPredictor, *, fraction: float = 0.25,
                   model_name: str | None = None, data_name: str | None = None, model_fp: str | None = None):
    """Profile only the predictor's most uncertain units of ``space``; predict the others."""
    from ..profile.run import profile_model, space_fingerprint  # noqa: PLC0415

    started = time.perf_counter()
    units = space.units(loaded.model)
    probes = space.probe_choices()
    measure = select_units_to_measure(predictor, loaded.model, probes, units=units, fraction=fraction)
    rest = [u for u in units if u not in measure]
    narrowed = dataclasses.replace(space, frozen=tuple(space.frozen) + tuple(rest))
    # The additivity check would change only the measured units: a misleading figure here.
    settings = dataclasses.replace(settings, additivity=False)
    profile = profile_model(loaded, stream, narrowed, settings, model_name=model_name, data_name=data_name,
                            model_fp=model_fp)
    # Put predictions on this model's level: the median measured / predicted ratio.
    guessed = predicted_kl(predictor, loaded.model, probes, measure)
    ratios = sorted(u.kl[label] / guessed[u.name][label] for u in profile.units for label in u.kl
                    if u.kl[label] > 0 and math.isfinite(u.kl[label]) and guessed[u.name][label] > 0)
    scale = ratios[len(ratios) // 2] if ratios else 1.0
    predicted = predicted_kl(predictor, loaded.model, probes, rest, scale=scale)
    from ..profile.artifact import UnitProfile  # noqa: PLC0415
    from .coordinates import model_coordinates  # noqa: PLC0415

    coords = model_coordinates(loaded.model)
    measured = {u.name: u for u in profile.units}
    ordered = []
    for name in units:
        if name in measured:
            ordered.append(measured[name])
        else:
            c = coords[name]
            ordered.append(UnitProfile(name=name, block=c.block, role=c.role, relative_depth=c.relative_depth,
                                       parameters=c.parameters, kl=predicted[name]))
    meta = {**profile.meta, "predicted_units": rest, "measured_units": measure, "predictor_scale": scale,
            "predictor_sources": predictor.sources}
    return dataclasses.replace(profile, units=ordered, space_fingerprint=space_fingerprint(space), meta=meta,
                               seconds=time.perf_counter() - started)


def guided_profile_run(model_spec: str, out_dir: str | Path, predict: str, *, fraction: float = 0.25,
                       data: str = "stdlib-docs", space="default", granularity: str | None = None, settings=None,
                       force: bool = False, trust_remote_code: bool = False, device="cpu", dtype=None):
    """:func:`guided_profile` from specs into ``out_dir/profile.json`` (refuses to overwrite without ``force``);
    the model runs on ``device`` stored in ``dtype`` (default float32, see :mod:`autocompress.device`)."""
    import torch  # noqa: PLC0415

    from ..data import Split, load_tokens  # noqa: PLC0415
    from ..models import load_model, model_fingerprint  # noqa: PLC0415
    from ..profile.run import ProfileOutcome, ProfileSettings, resolve_space  # noqa: PLC0415

    if not 0 < fraction <= 1:
        raise UserError(f"--measure-fraction must be in (0, 1], got {fraction}")
    settings = settings or ProfileSettings()
    predictor = load_predictor(predict)
    space = resolve_space(space, granularity)
    path = Path(out_dir) / "profile.json"
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to replace it with a predictor-guided profile")
    loaded = load_model(model_spec, dtype=dtype or torch.float32, device=device, trust_remote_code=trust_remote_code)
    wanted = max(settings.tokens, settings.role_tokens if settings.roles else 0)
    stream = load_tokens(data, loaded.tokenizer, Split.CALIBRATION, wanted)
    profile = guided_profile(loaded, stream, space, settings, predictor, fraction=fraction, model_name=model_spec,
                             data_name=data, model_fp=model_fingerprint(loaded.model))
    profile.save(path)
    return ProfileOutcome(profile, path, False)


__all__ = ["load_predictor", "guided_profile", "guided_profile_run"]
