"""Local safetensors weights loaded one tensor at a time, each with memory of its own.

transformers maps a bf16 checkpoint into memory and keeps every weight a view of that one
mapping, so the whole file stays resident until every weight is gone: a block replaced by its
compressed form frees nothing. :func:`stream_pretrained` builds the model empty and gives every
weight stored in the dtype asked for a copy-on-write mapping of its own (read when touched,
unmapped when the weight goes, its pages droppable between blocks:
:func:`~.host_memory.page_out`); one that needs converting is read into memory of its own.
Anything that does not fit (no local safetensors, renamed or missing keys, a damaged file)
returns None, and the caller falls back to ``from_pretrained`` and its messages.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header of a safetensors file (name -> dtype, shape, data_offsets; ``__metadata__``)
    and the byte offset where its data starts."""
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
    return header, 8 + length


def writable_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable buffer (shares its memory)."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def map_tensor(path: Path, start: int, target: torch.Tensor) -> torch.Tensor:
    """``target``'s values as a copy-on-write mapping of the file at ``start`` (same dtype and
    shape): pages are read when first touched, can be dropped again (:func:`~.host_memory.page_out`),
    and the mapping goes when the tensor does. Writing to it changes memory, never the file."""
    import numpy as np  # noqa: PLC0415

    nbytes = target.numel() * target.element_size()
    array = np.memmap(path, dtype=np.uint8, mode="c", offset=start, shape=(nbytes,)) if nbytes else \
        np.zeros(0, dtype=np.uint8)
    return torch.from_numpy(array).view(target.dtype).reshape(target.shape)


def read_tensor_into(handle, start: int, target: torch.Tensor, file_dtype: torch.dtype) -> None:
    """Fill ``target`` from the file position ``start`` holding its values in ``file_dtype``
    (read in place when the dtypes agree, else through one temporary of that tensor's size)."""
    direct = target.dtype == file_dtype and target.is_contiguous() and target.device.type == "cpu"
    buffer = target if direct else torch.empty(target.shape, dtype=file_dtype)
    view = writable_bytes(buffer)
    handle.seek(start)
    done = 0
    while done < len(view):
        count = handle.readinto(view[done:])
        if not count:
            raise OSError(f"{handle.name}: ends before the tensor it describes")
        done += count
    if not direct:
        with torch.no_grad():
            target.copy_(buffer)


def _safetensors_files(folder: Path) -> list[Path] | None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def load_safetensors_into(tensors: dict[str, torch.Tensor], files: list[Path], *, mapped: bool = False) -> bool:
    """Fill ``tensors`` (name -> tensor, tied ones sharing memory) from the safetensors ``files``,
    one tensor at a time. Returns False, having filled nothing, when the files do not hold
    exactly these names and shapes (a key is renamed, missing or extra). ``mapped``: a CPU
    tensor stored in its own dtype gets a mapping of the file of its own (:func:`map_tensor`)
    instead of a copy."""
    where: dict[str, tuple[Path, dict, int]] = {}
    for path in files:
        try:
            header, data_start = safetensors_header(path)
            entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
            end = max((data_start + entry["data_offsets"][1] for entry in entries.values()), default=data_start)
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
            return False  # a damaged file: the fallback loader says so in its own words
        if path.stat().st_size < end:
            return False
        where.update({name: (path, entry, data_start) for name, entry in entries.items()})
    owners: dict[tuple, list[str]] = {}
    for name, tensor in tensors.items():
        owners.setdefault((tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)), []).append(name)
    if set(where) - set(tensors):
        return False
    chosen = []
    for names in owners.values():
        stored = [name for name in names if name in where]
        if not stored:
            return False
        name = stored[0]
        path, entry, _ = where[name]
        if entry["dtype"] not in SAFETENSORS_DTYPES or tuple(entry["shape"]) != tuple(tensors[name].shape):
            return False
        chosen.append(name)
    handles = {}
    try:
        for name in chosen:
            path, entry, data_start = where[name]
            target, file_dtype = tensors[name], SAFETENSORS_DTYPES[entry["dtype"]]
            if mapped and target.dtype == file_dtype and target.device.type == "cpu":
                target.data = map_tensor(path, data_start + entry["data_offsets"][0], target)
                continue
            if path not in handles:
                handles[path] = open(path, "rb", buffering=0)
            read_tensor_into(handles[path], data_start + entry["data_offsets"][0], tensors[name],
                             SAFETENSORS_DTYPES[entry["dtype"]])
    finally:
        for handle in handles.values():
            handle.close()
    return True


def stream_pretrained(location: str, dtype: torch.dtype) -> nn.Module | None:
    """A local safetensors model built empty and filled tensor by tensor (see above); None where
    that does not fit (no local safetensors, renamed or missing keys): from_pretrained then."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig  # noqa: PLC0415
    from transformers.initialization import no_init_weights  # noqa: PLC0415

    folder = Path(location)
    files = _safetensors_files(folder) if folder.is_dir() else None
    if not files or not all(path.is_file() for path in files):
        return None
    config = AutoConfig.from_pretrained(location)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if not load_safetensors_into(dict(model.state_dict(keep_vars=True)), files, mapped=True):
        return None
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(location)
        except (OSError, ValueError):
            pass  # only generation defaults; the weights are what matter here
    return model.eval()
