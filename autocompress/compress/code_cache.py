"""GPTQ codes computed once per run and kept on disk, so profile, search and apply share them.

GPTQ is the slow part of every verb: the profile computes the codes of every (block, choice)
it measures, and without this cache the search's trials and ``apply`` would compute them
again. The codes are a pure function of the original weights, the run's calibration rows and
the choice (see :func:`~.apply.block_stats`), so they are stored under ``RUN/codes/``, one
safetensors file per block, keyed by the model's and the rows' fingerprints. A file made for
other weights, other rows or an older code format is ignored (and replaced), never trusted.

Example::

    cache = CodeCache.for_run("runs/x", model_fp, calibration_rows)
    stats = block_stats(block, model, inputs, choices=choices, cache=cache, index=3)
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ..schedule import Observer
from .quantize import QuantizedWeight

CODES_DIR = "codes"
# Bump when the quantizer's arithmetic changes: older files are then recomputed.
CODES_FORMAT = "1"


@dataclass(frozen=True)
class CodeCache:
    """Where a run keeps its GPTQ codes, and the key (weights, rows, format) they must match."""

    directory: Path
    key: str

    @classmethod
    def for_run(cls, run_dir: str | os.PathLike, model_fingerprint: str, rows: torch.Tensor) -> CodeCache:
        """The cache of ``run_dir`` for this model and these calibration rows [n, seq_len]."""
        from ..run_calibration import rows_fingerprint  # noqa: PLC0415

        return cls(Path(run_dir) / CODES_DIR, f"{model_fingerprint}:{rows_fingerprint(rows)}:{CODES_FORMAT}")

    def path(self, index: int) -> Path:
        """The file of block ``index``."""
        return self.directory / f"block-{index:04d}.safetensors"

    def load(self, index: int) -> dict[str, dict[tuple, QuantizedWeight]]:
        """Block ``index``'s stored codes: linear path -> memo key -> codes ({} when none match)."""
        path = self.path(index)
        if not path.exists():
            return {}
        try:
            with safetensors.safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("key") != self.key:
                    return {}
                out: dict[str, dict[tuple, QuantizedWeight]] = {}
                for entry in json.loads(meta["entries"]):
                    name = entry["name"]
                    q = QuantizedWeight(handle.get_tensor(f"{name}.packed"), handle.get_tensor(f"{name}.scales"),
                                        handle.get_tensor(f"{name}.zeros"), entry["bits"], entry["g"],
                                        entry["shape"][1])
                    out.setdefault(entry["path"], {})[_key(entry)] = q
                return out
        except (OSError, ValueError, KeyError, json.JSONDecodeError, safetensors.SafetensorError):
            return {}  # a torn or foreign file is a cache miss; the next save replaces it

    def save(self, index: int, memos: dict[str, dict[tuple, QuantizedWeight]]) -> None:
        """Write block ``index``'s codes (path -> memo) atomically; nothing is written when empty."""
        tensors, entries = {}, []
        for path, memo in memos.items():
            for key, q in memo.items():
                if key[0] == "gguf":
                    continue  # GGUF blocks are quick to redo; only GPTQ codes are kept
                bits, group, act_order, observer, shape = key
                name = f"c{len(entries)}"
                entries.append({"name": name, "path": path, "bits": bits, "group": group, "act_order": act_order,
                                "observer": Observer(observer).value, "shape": list(shape), "g": q.group_size})
                tensors[f"{name}.packed"] = q.packed.contiguous()
                tensors[f"{name}.scales"] = q.scales.contiguous()
                tensors[f"{name}.zeros"] = q.zeros.contiguous()
        if not entries:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.path(index)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=self.directory)
        os.close(fd)
        try:
            safetensors.torch.save_file(tensors, tmp, metadata={"key": self.key, "entries": json.dumps(entries)})
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _key(entry: dict) -> tuple:
    return (entry["bits"], entry["group"], entry["act_order"], Observer(entry["observer"]), tuple(entry["shape"]))
