"""Search spaces: which choices each unit may take, read from YAML and validated strictly.

A space file (``search_spaces/default.yaml`` and friends, or a user's own)::

    name: default
    granularity: block          # block | linear
    group_size: [64, 128]       # one size or a list to choose from per unit; null = per-channel
    method: gptq                # quantizer of profile, search and apply alike (rtn | gptq)
    act_order: true             # GPTQ visits columns by decreasing Hessian diagonal
    observer: best              # group scale/zero: minmax | mse | hqq | best (see schedule.Observer)
    bits: [3, 4, 5, 6, 8, 16]
    embedding_bits: [4, 5, 6, 8, 16]   # the token embedding (and a tied head) as a unit; [] = kept
    sparsity: [0.5]             # unstructured ratios (Wanda scores)
    two_four: true              # 2:4 sparsity as a choice
    head_ratio: [0.25, 0.5]     # share of KV groups (with their query heads) removed
    channel_ratio: [0.25, 0.5]  # share of MLP channels removed
    drop: true                  # whole block may be removed
    tie: [[q, k, v], [gate, up]]   # linear granularity: roles sharing one bit width
    mixes: [{v: 2, down: 1}]    # block granularity: also each bit width with these roles at more bits
    frozen: [model.layers.0]    # units kept as they are (regex with a 're:' prefix)

A GGUF space (``search_spaces/gguf.yaml``) names llama.cpp's block types instead of bit widths
and group sizes: ``gguf: [Q8_0, Q6_K, Q4_K]`` and ``embedding_gguf: [Q8_0, Q6_K]`` (``bits``
may then list only 16, the "keep" choice). Labels are ``bits=4/Q4_K``; bytes follow each
type's block layout, with llama.cpp's fallback type where a row is not a whole number of
blocks; a schedule from it exports to GGUF exactly as measured.

A *mix* (``mixes``, block granularity) adds, for every bit width below 8, an option that
quantizes some roles of the block at more bits (llama.cpp's ``_M`` recipes do this for the
value and down projections): ``{v: 2, down: 1}`` turns ``bits=4/g64`` into
``bits=4/g64:v6,down5`` (``Choice.role_bits``), capped at 8 bits. It is one more quantization
option: the profile measures it, the search combines it with pruning like any bit width.

The profile measures every *single-axis* choice of the space (:meth:`SearchSpace.probe_choices`);
the search combines one quantization (bit width and group size) with at most one pruning
choice per unit. Quantization labels are ``bits=4`` when the space has one group size and
``bits=4/g64`` when it offers several. The embedding unit's choices are labelled
``embed:bits=6/g64``; it is quantized round-to-nearest with the space's observer (no Hessian
serves both of a tied table's roles, so ``best`` weighs every column alike there).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..schedule import (ALLOWED_BITS, GGUF_TYPE_BITS, Choice, Observer, QuantMethod, SparsityPattern,
                        role_bits_label)


def label_bits(label: str) -> int:
    """The bit width of a quantization label (``bits=4``, ``bits=4/g64``)."""
    return int(label.split("=", 1)[1].split("/", 1)[0])


class Granularity(str, Enum):
    """What a unit is: a whole decoder block or a single linear layer."""

    BLOCK = "block"
    LINEAR = "linear"


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space (see the module docstring for the YAML form)."""

    name: str
    granularity: Granularity = Granularity.BLOCK
    group_sizes: tuple[int | None, ...] = (128,)
    method: QuantMethod = QuantMethod.RTN
    act_order: bool = False
    observer: Observer = Observer.MINMAX
    bits: tuple[int, ...] = (2, 3, 4, 8, 16)
    embedding_bits: tuple[int, ...] = ()
    sparsity: tuple[float, ...] = ()
    two_four: bool = False
    head_ratio: tuple[float, ...] = ()
    channel_ratio: tuple[float, ...] = ()
    drop: bool = False
    tie: tuple[tuple[str, ...], ...] = ()
    frozen: tuple[str, ...] = ()
    gguf: tuple[str, ...] = ()
    embedding_gguf: tuple[str, ...] = ()
    mixes: tuple[tuple[tuple[str, int], ...], ...] = ()  # per mix: (role, extra bits) pairs
    description: str = ""
    source: str = field(default="", compare=False)

    @property
    def group_size(self) -> int | None:
        """The first (or only) group size of the space."""
        return self.group_sizes[0]

    def quant_choice(self, bits: int, group_size: int | None | str = "first") -> Choice:
        """The choice that quantizes to ``bits`` with a group size of the space and its method."""
        group = self.group_size if group_size == "first" else group_size
        if bits >= 16:
            return Choice()
        return Choice(bits=bits, group_size=group, method=self.method,
                      act_order=self.act_order and self.method is QuantMethod.GPTQ, observer=self.observer)

    def quant_label(self, bits: int, group_size: int | None) -> str:
        """``bits=4`` (one group size in the space) or ``bits=4/g64`` (``/gch``: per channel)."""
        if bits >= 16 or len(self.group_sizes) == 1:
            return f"bits={bits}"
        return f"bits={bits}/g{'ch' if group_size is None else group_size}"

    def quant_choices(self) -> list[tuple[str, Choice]]:
        """Every quantizing choice (bit width below 16 x group size, or GGUF type), labelled."""
        if self.gguf:
            return [(f"bits={GGUF_TYPE_BITS[t]}/{t}", Choice(gguf=t)) for t in self.gguf]
        plain = [(self.quant_label(b, g), self.quant_choice(b, g)) for b in self.bits if b < 16
                 for g in self.group_sizes]
        mixed = []
        for mix in self.mixes:
            for label, choice in plain:
                role_bits = tuple(sorted((role, _raised(choice.bits, extra)) for role, extra in mix))
                if choice.bits < 8 and any(bits != choice.bits for _, bits in role_bits):
                    mixed.append((f"{label}:{role_bits_label(role_bits)}", dataclasses.replace(choice, role_bits=role_bits)))
        return plain + mixed

    def embedding_choices(self) -> list[tuple[str, Choice]]:
        """The embedding unit's quantizing choices (round-to-nearest), labelled ``embed:bits=...``."""
        if self.embedding_gguf:
            return [(f"embed:bits={GGUF_TYPE_BITS[t]}/{t}", Choice(gguf=t)) for t in self.embedding_gguf]
        return [(f"embed:{self.quant_label(b, g)}", Choice(bits=b, group_size=g, observer=self.observer))
                for b in self.embedding_bits if b < 16 for g in self.group_sizes]

    def prune_choices(self) -> list[tuple[str, Choice]]:
        """Every pruning choice of the space, labelled (``sparsity=0.5``, ``2:4``, ``heads=0.25``...)."""
        out = [(f"sparsity={r:g}", Choice(sparsity=r, pattern=SparsityPattern.UNSTRUCTURED)) for r in self.sparsity]
        if self.two_four:
            out.append(("2:4", Choice(sparsity=0.5, pattern=SparsityPattern.TWO_FOUR)))
        if self.granularity is Granularity.BLOCK:
            out += [(f"heads={r:g}", Choice(head_ratio=r)) for r in self.head_ratio]
            out += [(f"channels={r:g}", Choice(channel_ratio=r)) for r in self.channel_ratio]
            if self.drop:
                out.append(("drop", Choice(drop=True)))
        return out

    def probe_choices(self) -> list[tuple[str, Choice]]:
        """Single-axis choices a profile measures: each bit width below 16, each pruning choice."""
        return self.quant_choices() + self.prune_choices()

    def is_frozen(self, unit: str) -> bool:
        """Whether ``unit`` is kept as it is by this space."""
        for pattern in self.frozen:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], unit):
                    return True
            elif unit == pattern:
                return True
        return False

    def units(self, model) -> list[str]:
        """The searchable units of ``model`` under this space's granularity, frozen ones left out."""
        from ..models import adapter_for  # noqa: PLC0415

        adapter = adapter_for(model)
        names = []
        for index, _ in enumerate(adapter.blocks(model)):
            block = f"{adapter.blocks_path}.{index}"
            if self.granularity is Granularity.BLOCK:
                names.append(block)
            else:
                names += [f"{block}.{path}" for path in adapter.linears.values()]
        return [name for name in names if not self.is_frozen(name)]

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form (used for fingerprints and artifacts)."""
        group = self.group_size if len(self.group_sizes) == 1 else list(self.group_sizes)
        return {"name": self.name, "granularity": self.granularity.value, "group_size": group,
                "method": self.method.value, "act_order": self.act_order, "observer": self.observer.value,
                "bits": list(self.bits),
                "embedding_bits": list(self.embedding_bits), "sparsity": list(self.sparsity),
                "two_four": self.two_four, "head_ratio": list(self.head_ratio),
                "channel_ratio": list(self.channel_ratio), "drop": self.drop,
                "tie": [list(t) for t in self.tie], "frozen": list(self.frozen), "description": self.description,
                **({"gguf": list(self.gguf), "embedding_gguf": list(self.embedding_gguf)} if self.gguf else {}),
                **({"mixes": [dict(m) for m in self.mixes]} if self.mixes else {})}


_KEYS = {"name", "granularity", "group_size", "method", "act_order", "observer", "bits", "embedding_bits", "sparsity",
         "two_four", "head_ratio", "channel_ratio", "drop", "tie", "frozen", "description", "gguf",
         "embedding_gguf", "mixes"}
_ROLES = {"q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up"}


def _raised(bits: int, extra: int) -> int:
    """``bits + extra`` rounded up to a packable width (7 becomes 8), at most 8."""
    return min(b for b in ALLOWED_BITS if b >= min(bits + extra, 8))


def _mixes(value: Any, where: str) -> tuple[tuple[tuple[str, int], ...], ...]:
    if not isinstance(value, list) or any(
            not isinstance(m, dict) or not m or any(r not in _ROLES or isinstance(e, bool) or not isinstance(e, int)
                                                    or e < 1 for r, e in m.items()) for m in value):
        raise UserError(f"{where}: expected a list of mappings of role to extra bits such as [{{v: 2, down: 1}}] "
                        f"(roles from {sorted(_ROLES)}), got {value!r}")
    return tuple(tuple(sorted(m.items())) for m in value)


def _ratios(value: Any, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise UserError(f"{where}: expected a list of numbers in (0, 1), got {value!r}")
    for v in value:
        if not 0 < v < 1:
            raise UserError(f"{where}: ratio {v} is outside (0, 1)")
    return tuple(sorted(float(v) for v in value))


def _gguf_types(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or any(not isinstance(t, str) or t not in GGUF_TYPE_BITS for t in value):
        raise UserError(f"{where}: expected a list drawn from {list(GGUF_TYPE_BITS)}, got {value!r}")
    if len(set(value)) != len(value):
        raise UserError(f"{where}: a type is listed twice in {value!r}")
    return tuple(sorted(value, key=lambda t: (-GGUF_TYPE_BITS[t], list(GGUF_TYPE_BITS).index(t))))


def _observer(value: Any, where: str) -> Observer:
    try:
        return Observer(value)
    except ValueError:
        raise UserError(f"{where}: expected one of {[o.value for o in Observer]}, got {value!r}") from None


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{where}: expected true or false, got {value!r}")
    return value


def space_from_dict(data: Any, source: str = "<dict>") -> SearchSpace:
    """Validate a parsed YAML mapping into a :class:`SearchSpace`; errors name file and field."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a search space must be a mapping of settings")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise UserError(f"{source}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    where = lambda key: f"{source}: {key}"  # noqa: E731
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise UserError(f"{where('name')}: expected a non-empty string")
    try:
        granularity = Granularity(data.get("granularity", "block"))
    except ValueError:
        raise UserError(f"{where('granularity')}: expected block or linear, got {data['granularity']!r}") from None
    group_sizes = data.get("group_size", 128)
    group_sizes = group_sizes if isinstance(group_sizes, list) else [group_sizes]
    if not group_sizes or any(g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1)
                              for g in group_sizes):
        raise UserError(f"{where('group_size')}: expected a positive integer, null (per channel) or a non-empty "
                        f"list of them, got {data.get('group_size')!r}")
    if len(set(group_sizes)) != len(group_sizes):
        raise UserError(f"{where('group_size')}: a group size is listed twice in {group_sizes!r}")
    try:
        method = QuantMethod(data.get("method", "rtn"))
    except ValueError:
        raise UserError(f"{where('method')}: expected rtn or gptq, got {data['method']!r}") from None
    bits = data.get("bits", [16])
    if not isinstance(bits, list) or not bits or any(b not in ALLOWED_BITS or isinstance(b, bool) for b in bits):
        raise UserError(f"{where('bits')}: expected a non-empty list drawn from {list(ALLOWED_BITS)}, got {bits!r}")
    embedding_bits = data.get("embedding_bits", [])
    if not isinstance(embedding_bits, list) or any(b not in ALLOWED_BITS or isinstance(b, bool)
                                                   for b in embedding_bits):
        raise UserError(f"{where('embedding_bits')}: expected a list drawn from {list(ALLOWED_BITS)}, "
                        f"got {embedding_bits!r}")
    tie = data.get("tie", [])
    if not isinstance(tie, list) or any(not isinstance(t, list) or not set(t) <= _ROLES or len(t) < 2 for t in tie):
        raise UserError(f"{where('tie')}: expected lists of two or more roles from {sorted(_ROLES)}, got {tie!r}")
    frozen = data.get("frozen", [])
    if not isinstance(frozen, list) or not all(isinstance(f, str) for f in frozen):
        raise UserError(f"{where('frozen')}: expected a list of unit names, got {frozen!r}")
    for pattern in frozen:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise UserError(f"{where('frozen')}: bad regular expression {pattern!r} ({exc})") from None
    gguf = _gguf_types(data.get("gguf", []), where("gguf"))
    embedding_gguf = _gguf_types(data.get("embedding_gguf", []), where("embedding_gguf"))
    if embedding_gguf and not gguf:
        raise UserError(f"{where('embedding_gguf')}: needs gguf types for the decoder too (a gguf: list)")
    if gguf and (set(bits) != {16} and "bits" in data or embedding_bits):
        raise UserError(f"{where('gguf')}: a GGUF space lists types, not bit widths; keep bits to [16] (the "
                        f"keep choice) and use embedding_gguf instead of embedding_bits")
    if gguf and (method is not QuantMethod.RTN or data.get("act_order") or "group_size" in data):
        raise UserError(f"{where('gguf')}: GGUF types are quantized as llama.cpp does; drop method, act_order "
                        f"and group_size from the space")
    if embedding_gguf:
        embedding_bits = [16]
    mixes = _mixes(data.get("mixes", []), where("mixes"))
    if mixes and gguf:
        raise UserError(f"{where('mixes')}: mixes are options of group-wise codes; a gguf space names its types")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"{where('description')}: expected a string")
    space = SearchSpace(
        name=name, granularity=granularity, group_sizes=tuple(group_sizes), method=method,
        act_order=_flag(data.get("act_order", False), where("act_order")),
        observer=_observer(data.get("observer", "minmax"), where("observer")),
        bits=tuple(sorted(set(bits))), embedding_bits=tuple(sorted(set(embedding_bits) | {16})) if embedding_bits else (), sparsity=_ratios(data.get("sparsity", []), where("sparsity")),
        two_four=_flag(data.get("two_four", False), where("two_four")),
        head_ratio=_ratios(data.get("head_ratio", []), where("head_ratio")),
        channel_ratio=_ratios(data.get("channel_ratio", []), where("channel_ratio")),
        drop=_flag(data.get("drop", False), where("drop")),
        tie=tuple(tuple(t) for t in tie), frozen=tuple(frozen), gguf=gguf, embedding_gguf=embedding_gguf, mixes=mixes,
        description=description, source=source,
    )
    if space.granularity is Granularity.LINEAR and (space.head_ratio or space.channel_ratio or space.drop):
        raise UserError(f"{source}: head_ratio, channel_ratio and drop need granularity: block")
    if space.granularity is Granularity.LINEAR and space.mixes:
        raise UserError(f"{where('mixes')}: mixes are block options (roles of a block at more bits); with "
                        f"granularity: linear every linear has its own width already")
    if space.observer is not Observer.MINMAX and space.method is QuantMethod.GPTQ and not space.act_order:
        raise UserError(f"{where('observer')}: observer {space.observer.value!r} needs act_order: true with gptq")
    if space.act_order and space.method is not QuantMethod.GPTQ:
        raise UserError(f"{where('act_order')}: act-order is a GPTQ setting; set method: gptq or drop act_order")
    if len(space.bits) + len(space.gguf) == 1 and len(space.group_sizes) == 1 and not space.prune_choices() \
            and len(space.embedding_bits) + len(space.embedding_gguf) < 2:
        raise UserError(f"{source}: the space offers no choice (one bit width and no pruning)")
    return space


def builtin_spaces() -> list[str]:
    """Names of the spaces shipped in ``search_spaces/``."""
    root = importlib.resources.files("autocompress.search_spaces")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_space(spec: str) -> SearchSpace:
    """A space by built-in name (``default``, ``quant-only``, ``prune-only``) or YAML path."""
    path = Path(spec)
    if spec.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise UserError(f"search space file {spec!r} not found; give a YAML file or one of "
                            f"{', '.join(builtin_spaces())}")
        source = str(path)
        try:
            text = path.read_text()
        except UnicodeDecodeError as exc:
            raise UserError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start}); give a YAML file") from None
    elif spec in builtin_spaces():
        text = (importlib.resources.files("autocompress.search_spaces") / f"{spec}.yaml").read_text()
        source = f"{spec}.yaml"
    else:
        raise UserError(f"unknown search space {spec!r}: give a YAML file or one of {', '.join(builtin_spaces())}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{source}: not valid YAML{where} ({problem}); fix the file") from None
    return space_from_dict(data, source)


def check_space_measured(space: SearchSpace, profile, path="profile.json") -> None:
    """Refuse a space with a choice ``profile`` never measured, compared field by field, not by label.

    A quantizer, group size, act-order setting or pruning choice the profile did not measure
    would make the search's predictions meaningless; one line names the first difference.
    """
    wanted = space.probe_choices() + space.embedding_choices()
    for label, choice in wanted:
        measured = profile.choices.get(label)
        if measured is None:
            raise UserError(f"search space {space.name!r} offers {label!r}, which {path} never measured; "
                            f"profile with this space (autocompress profile ... --space {space.source or space.name})")
        if measured != choice.to_json():
            field_name = next((k for k, v in choice.to_json().items() if measured.get(k) != v), "?")
            raise UserError(f"search space {space.name!r} means {label!r} with {field_name}="
                            f"{choice.to_json()[field_name]!r}, but {path} measured it with {field_name}="
                            f"{measured.get(field_name)!r}; profile again with this space")
