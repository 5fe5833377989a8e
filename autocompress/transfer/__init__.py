"""Reuse learned schedules on new models: model-agnostic coordinates, transfer, warm start, predictor.

* :func:`describe` stores each choice at its role, relative depth and relative size.
* :func:`transfer_schedule` maps a schedule onto another model and repairs it to a budget,
  matching blocks by their signature (:func:`align_blocks`) when it can, else by relative depth.
* :func:`check_transfer` / :func:`exchanges` (``transfer_schedule(check_tokens=...)``) measure
  the transfer and byte-neutral alternatives on the target and keep the best.
* :func:`warm_start_schedules` gives a search its first trials from an earlier run.
* :class:`SensitivityPredictor` predicts per-unit sensitivity from cheap features, so a
  profile measures only the units it is unsure of (:func:`select_units_to_measure`).
"""
from .alignment import align_blocks, block_signature
from .check import check_transfer, exchanges
from .coordinates import agnostic_choices, describe, model_coordinates
from .repair import candidate_choices, repair
from .transfer import load_source, transfer_schedule, warm_start_schedules

__all__ = ["align_blocks", "block_signature", "check_transfer", "exchanges", "describe", "agnostic_choices", "model_coordinates", "repair", "candidate_choices", "load_source",
           "transfer_schedule", "warm_start_schedules"]
