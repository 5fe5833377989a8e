"""GGUF block quantizers: layouts, error bounds, and bytes identical to llama.cpp's."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from autocompress.errors import UserError
from autocompress.export import gguf_quants as gq
from autocompress.export.llamacpp import llamacpp_bin, llamacpp_tool

import gguf  # noqa: E402  (a dependency of autocompress)
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

LEGACY = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")

# Relative RMSE bounds measured on `_weights()` (unit normal, outlier columns, a zero row),
# with ~15% headroom; they hold with and without `_importance()`.
RMSE_BOUND = {
    "Q8_0": 0.009, "Q6_K": 0.026, "Q5_K": 0.048, "Q5_1": 0.050, "Q5_0": 0.066,
    "Q4_K": 0.094, "Q4_1": 0.100, "Q4_0": 0.133, "Q3_K": 0.198, "Q2_K": 0.365,
}


def _weights(rows=64, cols=512, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[:, [7, cols * 3 // 5]] *= 8  # outlier columns
    w[rows // 2] = 0  # an all-zero row
    return w


def _importance(cols=512, seed=1) -> np.ndarray:
    return (np.random.default_rng(seed).random(cols) * 3).astype(np.float32)


def _rel_rmse(a, b, weight=None) -> float:
    weight = np.ones(a.shape[1], np.float32) if weight is None else weight
    return float(np.sqrt(((a - b) ** 2 * weight).mean() / ((b**2) * weight).mean()))


# ---------------------------------------------------------------- layouts and fallbacks


def test_layouts_match_gguf_constants():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for name in gq.GGUF_WEIGHT_TYPES + ("F16", "BF16", "F32"):
        assert gq.block_layout(name) == GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    assert gq.row_bytes("Q4_K", 512) == 2 * 144
    assert gq.tensor_bytes("Q8_0", (3, 64)) == 3 * 2 * 34
    assert gq.tensor_bytes("F16", (7,)) == 14


def test_fallback_follows_llama_cpp():
    assert gq.fallback_type("Q4_K", 576) == "Q5_0"
    assert gq.fallback_type("Q5_K", 576) == "Q5_1"
    assert gq.fallback_type("Q6_K", 576) == "Q8_0"
    assert gq.fallback_type("Q3_K", 576) == "Q4_0"
    assert gq.fallback_type("Q2_K", 576) == "Q4_0"
    assert gq.fallback_type("Q4_K", 1536) == "Q4_K"
    assert gq.fallback_type("Q4_0", 576) == "Q4_0"
    assert gq.fallback_type("F16", 33) == "F16"
    with pytest.raises(UserError, match="multiple of 32"):
        gq.fallback_type("Q4_K", 100)
    with pytest.raises(UserError, match="multiple of 32"):
        gq.fallback_type("Q8_0", 48)


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="unknown GGUF type"):
        gq.block_layout("Q4_K_M")
    with pytest.raises(UserError, match="fallback_type"):
        gq.quantize(np.zeros((2, 576), np.float32), "Q4_K")
    with pytest.raises(UserError, match="2-D"):
        gq.quantize(np.zeros(256, np.float32), "Q4_K")
    with pytest.raises(UserError, match="importance"):
        gq.quantize(np.zeros((2, 256), np.float32), "Q4_K", np.ones(255, np.float32))


# ---------------------------------------------------------------- round trips and error bounds


@pytest.mark.parametrize("type_name", gq.GGUF_WEIGHT_TYPES)
def test_round_trip_and_error_bound(type_name):
    w = _weights()
    imp = _importance()
    errors = []
    for importance in (None, imp):
        packed = gq.quantize(w, type_name, importance)
        assert packed.dtype == np.uint8
        assert packed.shape == (64, gq.row_bytes(type_name, 512))
        assert packed.size == gq.tensor_bytes(type_name, w.shape)
        dense = gq.dequantize(packed, type_name, 512)
        reference = gguf_dequantize(packed, gguf.GGMLQuantizationType[type_name])
        np.testing.assert_array_equal(dense, reference.reshape(dense.shape))
        assert not dense[32].any()  # the zero row stays zero
        assert _rel_rmse(dense, w) < RMSE_BOUND[type_name]
        errors.append(_rel_rmse(dense, w, imp))
    if type_name != "Q8_0":
        # the imatrix path must pay off where it is measured: importance-weighted error
        assert errors[1] < errors[0]


def test_more_bits_less_error():
    w = _weights()
    errors = [_rel_rmse(gq.dequantize(gq.quantize(w, t), t, 512), w) for t in gq.GGUF_WEIGHT_TYPES]
    assert errors == sorted(errors)


def test_plain_float_types():
    w = _weights(4, 64)
    w[0, 0], w[0, 1] = np.float32(1.00390625), np.float32(np.nan)  # a BF16 tie, a NaN
    w[0, 2] = np.uint32(0xFFA00001).view(np.float32)  # a negative NaN with a payload
    bf16 = gguf_quantize(w, gguf.GGMLQuantizationType.BF16).view(np.uint8).reshape(4, -1)
    np.testing.assert_array_equal(gq.quantize(w, "BF16"), bf16)
    f16 = gq.quantize(w, "F16").view(np.uint16)
    assert f16[0, 1] == 0x7E00 and f16[0, 2] == 0xFE00  # ggml's canonical quiet NaN, sign kept
    np.testing.assert_array_equal(f16[1:], w[1:].astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(gq.dequantize(gq.quantize(w, "F32"), "F32", 64), w)


@pytest.mark.parametrize("type_name", LEGACY)
def test_legacy_bytes_match_gguf_package(type_name):
    for seed in range(3):
        w = _weights(32, 576, seed) * np.float32(10.0 ** (seed - 2))
        expected = gguf_quantize(w, gguf.GGMLQuantizationType[type_name])
        np.testing.assert_array_equal(gq.quantize(w, type_name), expected)


def test_fake_quantize_applies_fallback_and_keeps_device():
    w = torch.from_numpy(_weights(8, 576))
    dense = gq.fake_quantize(w, "Q4_K")
    assert dense.shape == w.shape and dense.dtype == torch.float32 and dense.device == w.device
    expected = gq.dequantize(gq.quantize(w.numpy(), "Q5_0"), "Q5_0", 576)
    np.testing.assert_array_equal(dense.numpy(), expected)
    imp = torch.from_numpy(_importance(576))
    weighted = gq.fake_quantize(w, "Q4_K", imp)
    np.testing.assert_array_equal(
        weighted.numpy(), gq.dequantize(gq.quantize(w, "Q5_0", imp.numpy()), "Q5_0", 576)
    )


# ---------------------------------------------------------------- bit-exact against llama-quantize


def _llama_quantize() -> Path:
    tool = llamacpp_tool("quantize")
    if tool is None:
        pytest.skip(f"{llamacpp_bin() / 'llama-quantize'} is missing; run `bench/llamacpp.sh build` to check "
                    f"against llama.cpp")
    return tool


def _tiny_model_tensors() -> dict[str, np.ndarray]:
    """2-D weights of several kinds; rows of 576 (K types fall back) and 256 (K types fit)."""
    rng = np.random.default_rng(7)
    normal = _weights(24, 576, seed=3) * np.float32(0.02)
    heavy = (rng.standard_t(2, (16, 576)) * 0.05).astype(np.float32)
    tiny = (rng.standard_normal((8, 576)) * 1e-5).astype(np.float32)  # subnormal fp16 scales
    down = _weights(24, 256, seed=4) * np.float32(0.05)
    down[3, :16] = -0.0
    down[4] = 0.5  # constant row
    ties = (np.round(rng.standard_normal((16, 256)) * 4) / 4).astype(np.float32)
    positive = np.abs(rng.standard_normal((8, 256))).astype(np.float32)
    return {
        "token_embd.weight": (rng.standard_normal((16, 576)) * 0.02).astype(np.float32),
        "blk.0.attn_q.weight": normal,
        "blk.0.attn_k.weight": heavy,
        "blk.0.attn_v.weight": tiny,
        "blk.0.ffn_down.weight": down,
        "blk.0.ffn_gate.weight": ties,
        "blk.0.ffn_up.weight": positive,
    }


def _write_tiny_llama(path: Path, tensors: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(576)
    writer.add_feed_forward_length(256)
    writer.add_head_count(9)
    writer.add_head_count_kv(3)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)  # ALL_F32
    writer.add_tensor("output_norm.weight", np.ones(576, np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(576, np.float32))
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_legacy_imatrix(path: Path, values: dict[str, np.ndarray]) -> None:
    """The legacy imatrix.dat layout common/imatrix-loader.cpp reads.

    int32 n_entries; per entry int32 name length, name, int32 ncall, int32 nval, float32[nval].
    llama-quantize divides the values by ncall, so ncall = 1 passes them through unchanged.
    """
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(values)))
        for name, v in values.items():
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", 1, v.size))
            f.write(np.ascontiguousarray(v, dtype="<f4").tobytes())


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    tool = _llama_quantize()
    folder = tmp_path_factory.mktemp("gguf_quants")
    tensors = _tiny_model_tensors()
    _write_tiny_llama(folder / "in.gguf", tensors)
    rng = np.random.default_rng(11)
    importance = {
        name: (rng.random(value.shape[1]) ** 3 * 5 + 1e-3).astype(np.float32)
        for name, value in tensors.items()
        if name.startswith("blk.")  # token_embd gets none, as from a real imatrix run
    }
    importance["blk.0.attn_v.weight"][:64] = 0  # zero importance must not break anything
    _write_legacy_imatrix(folder / "imatrix.dat", importance)
    return tool, folder, tensors, importance


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("type_name", gq.GGUF_WEIGHT_TYPES)
def test_bytes_identical_to_llama_quantize(llama_files, type_name, use_imatrix):
    tool, folder, tensors, importance = llama_files
    out = folder / f"out-{type_name}-{use_imatrix}.gguf"
    args = [str(tool), "--pure"]
    if use_imatrix:
        args += ["--imatrix", str(folder / "imatrix.dat")]
    args += [str(folder / "in.gguf"), str(out), type_name, "1"]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    quantized = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    for name, weight in tensors.items():
        kind = gq.fallback_type(type_name, weight.shape[1])
        tensor = quantized[name]
        assert tensor.tensor_type.name == kind, name
        ours = gq.quantize(weight, kind, importance.get(name) if use_imatrix else None)
        theirs = np.asarray(tensor.data).view(np.uint8).reshape(ours.shape)
        mismatched_rows = np.nonzero((ours != theirs).any(axis=1))[0]
        assert mismatched_rows.size == 0, f"{name} as {kind}: rows {mismatched_rows[:8]} differ"
