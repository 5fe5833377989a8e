"""Save and load compressed models: safetensors weights plus a record of their structure.

A compressed model directory holds

* ``model.safetensors``: packed codes (uint8), fp16 scales and zeros, every other tensor in
  16 bits; tied tensors once;
* ``config.json`` (the family's config, block count after dropping), ``schedule.json``, the
  tokenizer files;
* ``autocompress.json`` (versioned): each block's head layout, MLP width and, per linear, its
  shape and quantization, and the token embedding's quantization when its unit was quantized
  (``embedding``: rows, dim, bits, group size, and whether the head shares its codes); the
  config cannot express per-block sizes, so loading rebuilds the model from the config and
  then reshapes every block as recorded.

No pickle is involved anywhere: weights are safetensors, metadata JSON.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from ..artifacts import read_artifact, write_artifact
from ..errors import UserError
from ..models import HeadLayout, adapter_for, config_head_dim, normalize
from ..schedule import GGUF_TYPE_BITS, Schedule
from .apply import block_head_layout
from .gguf_linear import GGUFEmbedding, GGUFLinear, TiedGGUFLinear
from .prune import set_channel_attributes, set_head_attributes, set_submodule
from .quant_embedding import QuantEmbedding, TiedQuantLinear, embedding_scale
from .quantize import QuantLinear
from .storage import storage_dtype

RECORD_TYPE = "compressed-model"
RECORD_VERSION = 1
WEIGHTS = "model.safetensors"


def _linear_record(module: nn.Module) -> dict:
    if hasattr(module, "lora_record"):  # a LoRA wrapper (compress/lora.py): its base plus the adapters' shape
        return {**_linear_record(module.base), **module.lora_record()}
    record = {"out": module.out_features, "in": module.in_features, "bias": module.bias is not None}
    if isinstance(module, QuantLinear):
        record.update(bits=module.bits, group_size=module.group_size)
    elif isinstance(module, GGUFLinear):
        record.update(bits=GGUF_TYPE_BITS.get(module.gguf_type, 16), group_size=None, gguf=module.gguf_type)
    else:
        record.update(bits=16, group_size=None)
    return record


def structure_record(model: nn.Module) -> dict:
    """Per-block shapes and per-linear quantization of a compressed in-memory model."""
    adapter = adapter_for(model)
    blocks = []
    for block in adapter.blocks(model):
        layout = block_head_layout(block, adapter, model.config)
        blocks.append({"heads": layout.num_heads, "kv_heads": layout.num_kv_heads,
                       "channels": adapter.mlp_channels(block),
                       "linears": {path: _linear_record(block.get_submodule(path))
                                   for path in adapter.linears.values()}})
    head = model.get_submodule(adapter.lm_head)
    embedding = model.get_submodule(adapter.embeddings[0])
    embedding_record = None
    if isinstance(embedding, QuantEmbedding):
        embedding_record = {"name": adapter.embeddings[0], "rows": embedding.num_embeddings,
                            "dim": embedding.embedding_dim, "bits": embedding.bits,
                            "group_size": embedding.group_size, "padding_idx": embedding.padding_idx,
                            "tied": isinstance(head, TiedQuantLinear) and head.embedding is embedding}
    elif isinstance(embedding, GGUFEmbedding):
        embedding_record = {"name": adapter.embeddings[0], "rows": embedding.num_embeddings,
                            "dim": embedding.embedding_dim, "bits": GGUF_TYPE_BITS.get(embedding.gguf_type, 16),
                            "group_size": None, "gguf": embedding.gguf_type, "padding_idx": embedding.padding_idx,
                            "tied": isinstance(head, TiedGGUFLinear) and head.embedding is embedding}
    tied = embedding_record is not None and embedding_record["tied"]
    return {"family": adapter.family, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "blocks": blocks,
            "lm_head": _linear_record(head) if isinstance(head, (QuantLinear, GGUFLinear)) and not tied else None,
            "embedding": embedding_record}


def _tensors_to_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict in storage types with tied tensors once; plus alias name -> saved name."""
    tensors, aliases, owner = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in owner:
            aliases[name] = owner[key]
            continue
        owner[key] = name
        if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.bfloat16):
            tensor = tensor.to(storage_dtype(tensor))
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors, aliases


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False
    where the system or the file system cannot."""
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def staging_dir(out_dir: Path) -> Path:
    """A fresh hidden folder beside ``out_dir`` to write into before :func:`commit_dir` (UserError if it cannot)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".part", dir=out_dir.parent))
    except OSError as exc:
        raise UserError(f"cannot write {out_dir}: {exc.strerror or exc}; choose another output directory") from None


def commit_dir(staging: Path, out_dir: Path) -> None:
    """Put the finished ``staging`` folder in place of ``out_dir``: one atomic exchange where the
    system allows, else two renames (a short window without ``out_dir``, never a half one)."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    if not _exchange(staging, out_dir):
        trash = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(trash, ignore_errors=True)  # left by a process killed here before
        os.replace(out_dir, trash)
        os.replace(staging, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)  # the old directory, after an exchange


def save_compressed(model: nn.Module, tokenizer, schedule: Schedule | None, out_dir: str | os.PathLike, *,
                    overwrite: bool = False, artifacts: dict[str, tuple[str, int, dict]] | None = None) -> Path:
    """Write a compressed model directory; a failure leaves no partial ``out_dir``.

    Everything is written into a temporary sibling directory that is renamed into place at
    the end (swapped with an existing ``out_dir`` in one step where the system can), so a
    reader, or a process killed at any point, sees the old directory or the new one whole.
    An existing ``out_dir`` is refused unless ``overwrite``. ``artifacts`` (file name ->
    (type, version, data)) are written into the directory too, committed with the weights.

    Example::

        apply(model, schedule, tokens)
        save_compressed(model, tokenizer, schedule, "runs/x/model")
        model, tokenizer = load_compressed("runs/x/model")
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir} already exists; choose another output directory or allow overwriting")
    staging = staging_dir(out_dir)
    try:
        tensors, aliases = _tensors_to_save(model)
        safetensors.torch.save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        if schedule is not None:
            schedule.save(staging / "schedule.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        record = structure_record(model)
        record["aliases"] = aliases
        write_artifact(staging / "autocompress.json", RECORD_TYPE, RECORD_VERSION, record)
        for name, (kind, version, data) in (artifacts or {}).items():
            write_artifact(staging / name, kind, version, data)
        commit_dir(staging, out_dir)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk, a lost mount: the old directory (if any) is untouched
            raise UserError(f"cannot write {out_dir}: {exc.strerror or exc}; free some space or choose another "
                            f"output directory") from None
        raise
    return out_dir


def _empty_linear(record: dict, dtype: torch.dtype) -> nn.Module:
    if record.get("lora_rank"):
        from .lora import LoRAQuantLinear  # noqa: PLC0415

        return LoRAQuantLinear.empty(_empty_linear({**record, "lora_rank": 0}, dtype), record)
    if record.get("gguf"):
        return GGUFLinear(record["in"], record["out"], record["gguf"], bias=record["bias"], dtype=dtype)
    if record["bits"] < 16:
        return QuantLinear(record["in"], record["out"], record["bits"], record["group_size"],
                           bias=record["bias"], dtype=dtype)
    return nn.Linear(record["in"], record["out"], bias=record["bias"], dtype=dtype)


def _check_record(record: dict, path: Path) -> None:
    for key in ("family", "dtype", "blocks", "lm_head", "aliases"):
        if key not in record:
            raise UserError(f"{path}: field {key!r} is missing")
    if not isinstance(record["blocks"], list):
        raise UserError(f"{path}: field 'blocks' must be a list")


def rebuild(config, record: dict) -> nn.Module:
    """An empty model of ``config`` reshaped as ``record`` says (weights still to be loaded)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415
    from transformers.initialization import no_init_weights  # noqa: PLC0415

    dtype = getattr(torch, record["dtype"])
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = normalize(model)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    if len(blocks) != len(record["blocks"]):
        raise UserError(f"config.json has {len(blocks)} blocks but autocompress.json records {len(record['blocks'])}")
    head_dim = config_head_dim(model.config)
    for block, shape in zip(blocks, record["blocks"]):
        for path, linear in shape["linears"].items():
            set_submodule(block, path, _empty_linear(linear, dtype))
        set_head_attributes(block, adapter, HeadLayout(shape["heads"], shape["kv_heads"], head_dim))
        set_channel_attributes(block, adapter, shape["channels"])
    if record["lm_head"] is not None:
        set_submodule(model, adapter.lm_head, _empty_linear(record["lm_head"], dtype))
    if record.get("embedding") is not None:
        _rebuild_embedding(model, adapter, record["embedding"], dtype)
    return model


def _rebuild_embedding(model: nn.Module, adapter, spec: dict, dtype: torch.dtype) -> None:
    """An empty :class:`QuantEmbedding` in place of the token embedding (and the tied head on its codes)."""
    name = adapter.embeddings[0]
    if spec.get("name", name) != name:
        raise UserError(f"autocompress.json records the embedding {spec['name']!r}, but this family's is {name!r}")
    original = model.get_submodule(name)
    if spec.get("gguf"):
        embedding = GGUFEmbedding(spec["rows"], spec["dim"], spec["gguf"], padding_idx=spec.get("padding_idx"),
                                  embed_scale=embedding_scale(original), dtype=dtype)
        set_submodule(model, name, embedding)
        if spec.get("tied"):
            head = model.get_submodule(adapter.lm_head)
            set_submodule(model, adapter.lm_head, TiedGGUFLinear(embedding, getattr(head, "bias", None)))
        return
    embedding = QuantEmbedding(spec["rows"], spec["dim"], spec["bits"], spec["group_size"],
                               padding_idx=spec.get("padding_idx"), embed_scale=embedding_scale(original), dtype=dtype)
    set_submodule(model, name, embedding)
    if spec.get("tied"):
        head = model.get_submodule(adapter.lm_head)
        bias = getattr(head, "bias", None)
        set_submodule(model, adapter.lm_head, TiedQuantLinear(embedding, bias))


def load_compressed(path: str | os.PathLike) -> tuple[nn.Module, object]:
    """Load a directory written by :func:`save_compressed`; returns (model in eval mode, tokenizer).

    Raises :class:`UserError` for a missing or corrupt weights file or record.
    """
    from transformers import AutoConfig, AutoTokenizer  # noqa: PLC0415

    path = Path(path)
    record = read_artifact(path / "autocompress.json", RECORD_TYPE, RECORD_VERSION)
    _check_record(record, path / "autocompress.json")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights}: weights file is missing; the compressed model directory is incomplete")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path / 'config.json'}: cannot read config ({str(exc).splitlines()[0]})") from None
    model = rebuild(config, record)
    try:
        tensors = safetensors.torch.load_file(str(weights))
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{weights}: corrupt weights file ({str(exc).splitlines()[0]}); save the model again") from None
    expected = model.state_dict()
    for alias, owner in record["aliases"].items():
        if owner in tensors:
            tensors[alias] = tensors[owner]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise UserError(f"{weights}: does not match autocompress.json ({'missing' if missing else 'unexpected'} "
                        f"tensor {first!r})")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"{weights}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"autocompress.json says {tuple(expected[name].shape)}")
        tensors[name] = tensor.to(expected[name].dtype)
    model.load_state_dict(tensors, strict=True)
    if record["lm_head"] is None and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # from_config may leave the head untied: one copy in memory, as on disk
    tokenizer = None
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
