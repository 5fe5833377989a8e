"""llama.cpp's K-type quantizers (Q2_K..Q6_K), bit-exact with ggml-quants.c, and the exact
float32 arithmetic they share with the legacy types.

This is the machinery under :mod:`autocompress.export.gguf_quants`, which holds the public API
and the legacy 32-value types (those reuse the helpers and the scale searches here). Each K
packer follows the C code it mirrors: without importance `quantize_row_<type>_ref`, with
importance the imatrix path of `quantize_<type>` (`quantize_row_<type>_impl`,
`make_qkx3_quants`, `make_qp_quants`). Every packer takes [blocks, 256] float32 values and
returns the [blocks, bytes per block] uint8 super-blocks.

How the arithmetic stays bit-exact (ggml-base is built without -march=native, so C does
plain IEEE float32 operations, no fused multiply-add):
- every array is float32 and every constant a float32 scalar, so numpy rounds as C does;
- arrays are laid out [position in block, block]; sums loop over positions in C order and
  vectorize across blocks (numpy's pairwise sum would round differently);
- C loops that stop early (coordinate descent) run their full count: a block that did not
  change in one pass would not change in the next;
- uint8/int8 stores wrap exactly as C's implicit conversions do.
"""

from __future__ import annotations

import numpy as np

F = np.float32
_EPS = F(1e-15)  # GROUP_MAX_EPS


# ---------------------------------------------------------------- small exact helpers


def _fp16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even; every NaN becomes a signed 0x7E00) as [B, 2] bytes."""
    v = np.asarray(v, F)
    with np.errstate(over="ignore", invalid="ignore"):
        half = v.astype(np.float16).view(np.uint16)
    nan = np.isnan(v)
    if nan.any():
        half = np.where(nan, (v.view(np.uint32) >> 16).astype(np.uint16) & 0x8000 | 0x7E00, half)
    return half.astype(np.uint16).view(np.uint8).reshape(-1, 2)


def _half(packed: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32 of [B, 2] fp16 bytes, as a [B, 1] column."""
    return packed.view(np.float16).astype(F)


def _nint(v: np.ndarray) -> np.ndarray:
    """nearest_int: the 1.5*2^23 magic-number trick (half to even), int32 result."""
    bits = (np.asarray(v, F) + F(12582912.0)).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


def _f(v: np.ndarray) -> np.ndarray:
    return v.astype(F)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """`float s = 0; for (i...) s += a[i];` over axis 0, vectorized over blocks."""
    s = np.zeros(a.shape[1:], F)
    for row in a:
        s += row
    return s


def _first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|max|, signed max) of the first element with the largest |x| (C's strict `>` scan)."""
    amax = np.zeros(x.shape[1:], F)
    vmax = np.zeros(x.shape[1:], F)
    for row in x:
        ax = np.abs(row)
        upd = ax > amax
        amax = np.where(upd, ax, amax)
        vmax = np.where(upd, row, vmax)
    return amax, vmax


def _running_max(x: np.ndarray) -> np.ndarray:
    """`float m = 0; for (...) if (x > m) m = x;` over axis 0."""
    m = np.zeros(x.shape[1:], F)
    for row in x:
        m = np.where(row > m, row, m)
    return m


def _pos_major(blocks: np.ndarray, n: int) -> np.ndarray:
    """[values] split into blocks of n, laid out [n, blocks] so C's inner loop is axis 0."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def _u8(v) -> np.ndarray:
    return (np.asarray(v) & 0xFF).astype(np.uint8)


# ---------------------------------------------------------------- ggml-quants.c search routines


def _make_qx_quants(x, nmax, w):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, w): (scale [B], L [n, B] in 0..2*nmax-1)."""
    amax, vmax = _first_absmax(x)
    zero = amax < _EPS
    vmax = np.where(zero, F(1), vmax)

    def attempt(iscale):
        lv = np.clip(_nint(iscale * x), -nmax, nmax - 1)
        lf = _f(lv)
        return lv + nmax, _seqsum(w * x * lf), _seqsum(w * lf * lf)

    L, sumlx, suml2 = attempt(F(-nmax) / vmax)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F(1)), F(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand, slx, sl2 = attempt(-(F(nmax) + F(0.1) * F(step)) / vmax)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(better, cand, L)
        scale = np.where(better, slx / np.where(better, sl2, F(1)), scale)
        best = np.where(better, scale * slx, best)
    return np.where(zero, F(0), scale), np.where(zero, 0, L)


def _make_q3_quants(x, nmax):
    """make_q3_quants(n, nmax, x, L, do_rmse=true): (scale, L in 0..2*nmax-1)."""
    amax, vmax = _first_absmax(x)
    zero = amax < _EPS
    vmax = np.where(zero, F(1), vmax)
    L = np.clip(_nint(F(-nmax) / vmax * x), -nmax, nmax - 1)
    w = x * x
    lf = _f(L)
    sumlx = _seqsum(w * x * lf)
    suml2 = _seqsum(w * lf * lf)
    for _ in range(5):
        for i in range(x.shape[0]):
            wi, xi, li = w[i], x[i], _f(L[i])
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            pos = slx > 0
            new = np.clip(_nint(xi * sl2 / np.where(pos, slx, F(1))), -nmax, nmax - 1)
            nf = _f(new)
            slx2 = slx + wi * xi * nf
            sl22 = sl2 + wi * nf * nf
            acc = pos & (new != L[i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = np.where(acc, new, L[i])
            sumlx = np.where(acc, slx2, sumlx)
            suml2 = np.where(acc, sl22, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F(1)), F(0))
    return np.where(zero, F(0), scale), np.where(zero, 0, L + nmax)


def _make_qkx_quants(x, nmax, w, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants / make_qkx3_quants with weights: (scale, the_min, L in 0..nmax)."""
    lo, hi = x[0].copy(), x[0].copy()
    sum_w = w[0].copy()
    sum_x = sum_w * x[0]
    for i in range(1, x.shape[0]):
        lo = np.where(x[i] < lo, x[i], lo)
        hi = np.where(x[i] > hi, x[i], hi)
        sum_w += w[i]
        sum_x += w[i] * x[i]
    lo = np.where(lo > 0, F(0), lo)
    flat = hi <= lo
    span = np.where(flat, F(1), hi - lo)

    def error(scale, lv, mn):
        diff = scale * _f(lv) + mn - x
        diff = np.abs(diff) if use_mad else diff * diff
        return _seqsum(w * diff)

    iscale = F(nmax) / span
    scale = F(1) / iscale
    L = np.clip(_nint(iscale * (x - lo)), 0, nmax)
    best = error(scale, L, lo)
    mn = lo  # C keeps updating `min`: later steps measure from the best min so far
    for step in range(nstep + 1):
        span = np.where(flat, F(1), hi - mn)
        iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / span
        laux = np.clip(_nint(iscale * (x - mn)), 0, nmax)
        lf = _f(laux)
        sum_l = _seqsum(w * lf)
        sum_l2 = _seqsum(w * lf * lf)
        sum_xl = _seqsum(w * lf * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        Ds = np.where(D > 0, D, F(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        clamp = this_min > 0
        this_min = np.where(clamp, F(0), this_min)
        this_scale = np.where(clamp, sum_xl / np.where(sum_l2 != 0, sum_l2, F(1)), this_scale)
        err = error(this_scale, laux, this_min)
        upd = (D > 0) & (err < best)
        L = np.where(upd, laux, L)
        best = np.where(upd, err, best)
        scale = np.where(upd, this_scale, scale)
        mn = np.where(upd, this_min, mn)
    mn = np.where(flat, lo, mn)
    return np.where(flat, F(0), scale), -mn, np.where(flat, 0, L)


def _make_qp_quants(x, nmax, w):
    """make_qp_quants(n, nmax, x, L, w) for non-negative x: (scale, L as uint8 values)."""
    mx = np.zeros(x.shape[1:], F)
    for row in x:
        mx = np.where(mx > row, mx, row)  # MAX(max, x[i])
    zero = mx < _EPS
    mx = np.where(zero, F(1), mx)
    iscale = F(nmax) / mx
    L = _nint(iscale * x) & 0xFF  # stored into uint8_t
    diff = x - (F(1) / iscale) * _f(L)
    best = _seqsum(w * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F(0.1) * F(step) + F(nmax)) / mx
        lv = np.minimum(_nint(iscale_is * x), nmax)
        diff = x - (F(1) / iscale_is) * _f(lv)
        mse = _seqsum(w * diff * diff)
        upd = mse < best
        best = np.where(upd, mse, best)
        iscale = np.where(upd, iscale_is, iscale)
    lv = np.minimum(_nint(iscale * x), nmax)
    L = lv & 0xFF
    sumlx = _seqsum(w * x * _f(lv))
    suml2 = _seqsum(w * _f(lv) * _f(lv))
    for _ in range(5):
        for i in range(x.shape[0]):
            wi, xi, li = w[i], x[i], _f(L[i])
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = np.minimum(_nint(xi * sl2 / np.where(ok, slx, F(1))), nmax)
            nf = _f(new)
            slx2 = slx + wi * xi * nf
            sl22 = sl2 + wi * nf * nf
            acc = ok & (new != L[i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = np.where(acc, new & 0xFF, L[i])
            sumlx = np.where(acc, slx2, sumlx)
            suml2 = np.where(acc, sl22, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F(1)), F(0))
    return np.where(zero, F(0), scale), np.where(zero, 0, L)


# ---------------------------------------------------------------- bit packing


def _pack_2bit(L):
    """qs of Q2_K/Q3_K: four 2-bit values 32 apart share a byte, per 128-value half."""
    c = L.reshape(-1, 2, 4, 32)
    return _u8(c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(-1, 64)


def _pack_k4_scales(ls, lm):
    """The 12 scale bytes of Q4_K/Q5_K from eight 6-bit scales and mins ([B, 8] uint8 values)."""
    s = np.zeros((ls.shape[0], 12), np.int64)
    for j in range(8):
        if j < 4:
            s[:, j] = ls[:, j]
            s[:, j + 4] = lm[:, j]
        else:
            s[:, j + 4] = (ls[:, j] & 0xF) | ((lm[:, j] & 0xF) << 4)
            s[:, j - 4] |= (ls[:, j] >> 4) << 6
            s[:, j] |= (lm[:, j] >> 4) << 6
    return _u8(s)


def _unpack_k4_scales(s):
    """get_scale_min_k4 for j = 0..7: ([B, 8] scales, [B, 8] mins)."""
    s = s.astype(np.int64)
    sc = np.empty((s.shape[0], 8), np.int64)
    m = np.empty_like(sc)
    sc[:, :4] = s[:, :4] & 63
    m[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, m


def _pack_q3_scales(l):
    """The 12 scale bytes of Q3_K from sixteen 6-bit values ([B, 16])."""
    s = np.zeros((l.shape[0], 12), np.int64)
    for j in range(16):
        v = l[:, j]
        if j < 8:
            s[:, j] = v & 0xF
        else:
            s[:, j - 8] |= (v & 0xF) << 4
        s[:, 8 + j % 4] |= (v >> 4) << (2 * (j // 4))
    return _u8(s)


def _unpack_q3_scales(s):
    """Signed Q3_K sub-block scales (-32..31), [B, 16]."""
    s = s.astype(np.int64)
    out = np.empty((s.shape[0], 16), np.int64)
    for j in range(16):
        low = s[:, j] & 0xF if j < 8 else s[:, j - 8] >> 4
        high = (s[:, 8 + j % 4] >> (2 * (j // 4))) & 3
        out[:, j] = (((low | (high << 4)) - 32 + 128) & 0xFF) - 128
    return out


def _requant(x, L, d, dm, lo, hi, sub, offset=0):
    """Final rounding of every value against its stored (fp16-rounded) scale and min.

    x, L: [B, 256]; d, dm: [B, n_sub] in float32. Stores clamp(nearest_int((x + dm) / d)) + offset;
    sub-blocks whose d is 0 keep L, as the C `continue`s past them.
    """
    d_full = np.repeat(d, sub, axis=1)
    nz = d_full != 0
    q = np.clip(_nint((x + np.repeat(dm, sub, axis=1)) / np.where(nz, d_full, F(1))), lo, hi)
    return np.where(nz, q + offset, L)


# ---------------------------------------------------------------- K types (256-value super-blocks)


def _superblock_sigma2(blocks, factor):
    """factor*sum(x^2)/QK_K per super-block, C order."""
    xt = _pos_major(blocks, 256)
    return F(factor) * _seqsum(xt * xt) / F(256)


def _by_sub(values, nsub):
    """[B*nsub] sub-block results -> [B, nsub]."""
    return values.reshape(-1, nsub)


def _q2_K(blocks, imp=None, x=None):
    nb = blocks.shape[0]
    xs = _pos_major(blocks, 16)
    if imp is None:
        scales, mins, L = _make_qkx_quants(xs, 3, np.abs(xs), -0.5, 0.1, 15, True)
        scales, mins = _by_sub(scales, 16), _by_sub(mins, 16)
        max_scale, max_min = _running_max(scales.T), _running_max(mins.T)
        has_s, has_m = max_scale > 0, max_min > 0
        inv_s = F(15) / np.where(has_s, max_scale, F(1))
        inv_m = F(15) / np.where(has_m, max_min, F(1))
        ls = np.where(has_s[:, None], _nint(inv_s[:, None] * scales), 0)
        lm = np.where(has_m[:, None], _nint(inv_m[:, None] * mins), 0)
        sc = _u8(ls | (lm << 4))
        d16 = _fp16(np.where(has_s, max_scale / F(15), F(0)))
        m16 = _fp16(np.where(has_m, max_min / F(15), F(0)))
    else:
        sigma2 = np.repeat(_superblock_sigma2(blocks, 1), 16)
        w = _pos_major(imp, 16) * np.sqrt(sigma2 + xs * xs)
        sw = _by_sub(_seqsum(w), 16)
        scales, mins, L = _make_qkx_quants(xs, 3, w, -0.9, 0.05, 36, False)
        dm, ls = _make_qp_quants(_by_sub(scales, 16).T.copy(), 15, sw.T.copy())
        mm, lm = _make_qp_quants(_by_sub(mins, 16).T.copy(), 15, sw.T.copy())
        sc = _u8(ls.T | (lm.T << 4))
        d16, m16 = _fp16(dm), _fp16(mm)
    d = _half(d16)
    dmin = _half(m16)
    scv = sc.astype(np.int64)
    L = _requant(blocks, L.T.reshape(nb, 256), d * _f(scv & 0xF), dmin * _f(scv >> 4), 0, 3, 16)
    return np.hstack([sc, _pack_2bit(L), d16, m16])


def _q3_K(blocks, imp=None, x=None):
    nb = blocks.shape[0]
    xs = _pos_major(blocks, 16)
    if imp is None:
        scales, L = _make_q3_quants(xs, 4)
        scales = _by_sub(scales, 16)
        _, max_scale = _first_absmax(scales.T)
        has = max_scale != 0
        iscale = F(-32) / np.where(has, max_scale, F(1))
        l8 = ((_nint(iscale[:, None] * scales) + 128) & 0xFF) - 128  # int8_t l = nearest_int(...)
        lq = np.where(has[:, None], np.clip(l8, -32, 31) + 32, 0)
        packed = np.where(has[:, None], _pack_q3_scales(lq), 0).astype(np.uint8)
        d16 = _fp16(np.where(has, F(1) / np.where(has, iscale, F(1)), F(0)))
    else:
        sigma2 = np.repeat(_superblock_sigma2(blocks, 2), 16)
        w = _pos_major(imp, 16) * np.sqrt(sigma2 + xs * xs)
        sw = _by_sub(_seqsum(w), 16)
        scales, L = _make_qx_quants(xs, 4, w)
        d_block, ls = _make_qx_quants(_by_sub(scales, 16).T.copy(), 32, sw.T.copy())
        packed = _pack_q3_scales(ls.T)
        d16 = _fp16(d_block)
    d = _half(d16)
    sc = _unpack_q3_scales(packed)
    L = _requant(blocks, L.T.reshape(nb, 256), d * _f(sc), np.zeros(sc.shape, F), -4, 3, 16, 4)
    high = L > 3
    L = np.where(high, L - 4, L)
    hmask = (high.reshape(nb, 8, 32).astype(np.int64) << np.arange(8)[None, :, None]).sum(axis=1)
    return np.hstack([_u8(hmask), _pack_2bit(L), packed, d16])


def _q456_K_subblocks(blocks, imp, nmax, ref_args):
    """Sub-block search shared by Q4_K and Q5_K: (scales, mins, L) with [B, 8] scales."""
    xs = _pos_major(blocks, 32)
    if imp is None:
        av_x = np.sqrt(_seqsum(xs * xs) / F(32))
        w = av_x + np.abs(xs)
        scales, mins, L = _make_qkx_quants(xs, nmax, w, *ref_args, False)
        return _by_sub(scales, 8), _by_sub(mins, 8), L, None
    sigma2 = np.repeat(_superblock_sigma2(blocks, 2), 8)
    w = _pos_major(imp, 32) * np.sqrt(sigma2 + xs * xs)
    sw = _by_sub(_seqsum(w), 8)
    scales, mins, L = _make_qkx_quants(xs, nmax, w, -0.9, 0.05, 36, False)
    return _by_sub(scales, 8), _by_sub(mins, 8), L, sw


def _k4_scales(scales, mins, sw, clamp_impl):
    """Quantized 6-bit scales/mins and the fp16 super-block scale and min."""
    if sw is None:
        max_scale, max_min = _running_max(scales.T), _running_max(mins.T)
        inv_s = np.where(max_scale > 0, F(63) / np.where(max_scale > 0, max_scale, F(1)), F(0))
        inv_m = np.where(max_min > 0, F(63) / np.where(max_min > 0, max_min, F(1)), F(0))
        ls = np.minimum(63, _nint(inv_s[:, None] * scales) & 0xFF)
        lm = np.minimum(63, _nint(inv_m[:, None] * mins) & 0xFF)
        return ls, lm, _fp16(max_scale / F(63)), _fp16(max_min / F(63))
    d_block, ls = _make_qp_quants(scales.T.copy(), 63, sw.T.copy())
    m_block, lm = _make_qp_quants(mins.T.copy(), 63, sw.T.copy())
    ls, lm = ls.T, lm.T
    if clamp_impl:
        ls, lm = np.minimum(63, ls), np.minimum(63, lm)
    return ls, lm, _fp16(d_block), _fp16(m_block)


def _k45_codes(blocks, imp, nmax: int, search: tuple, clamp: bool):
    """Q4_K's and Q5_K's common part: (d, dmin fp16, packed 6-bit scales, codes [nb, 4, 2, 32])."""
    nb = blocks.shape[0]
    scales, mins, L, sw = _q456_K_subblocks(blocks, imp, nmax, search)
    ls, lm, d16, m16 = _k4_scales(scales, mins, sw, clamp)
    packed = _pack_k4_scales(ls, lm)
    sc, m = _unpack_k4_scales(packed)
    d, dmin = _half(d16), _half(m16)
    L = _requant(blocks, L.T.reshape(nb, 256), d * _f(sc), dmin * _f(m), 0, nmax, 32)
    return d16, m16, packed, L.reshape(nb, 4, 2, 32)


def _q4_K(blocks, imp=None, x=None):
    nb = blocks.shape[0]
    d16, m16, packed, c = _k45_codes(blocks, imp, 15, (-1.0, 0.1, 20), False)
    qs = _u8(c[:, :, 0] | (c[:, :, 1] << 4)).reshape(nb, 128)
    return np.hstack([d16, m16, packed, qs])


def _q5_K(blocks, imp=None, x=None):
    nb = blocks.shape[0]
    d16, m16, packed, c = _k45_codes(blocks, imp, 31, (-0.5, 0.1, 15), True)
    qs = _u8((c[:, :, 0] & 0xF) | ((c[:, :, 1] & 0xF) << 4)).reshape(nb, 128)
    shifts = 2 * np.arange(4)[None, :, None]
    qh = ((((c[:, :, 0] >> 4) & 1) << shifts) | (((c[:, :, 1] >> 4) & 1) << (shifts + 1))).sum(axis=1)
    return np.hstack([d16, m16, packed, _u8(qh), qs])


def _q6_K(blocks, imp=None, x=None):
    nb = blocks.shape[0]
    xs = _pos_major(blocks, 16)
    w = xs * xs if imp is None else _pos_major(imp, 16)
    scales, L = _make_qx_quants(xs, 32, w)
    scales = _by_sub(scales, 16)
    amax, max_scale = _first_absmax(scales.T)
    live = amax >= _EPS
    iscale = F(-128) / np.where(live, max_scale, F(1))
    d16 = _fp16(F(1) / iscale)
    sc8 = _u8(np.minimum(127, _nint(iscale[:, None] * scales)))
    d = _half(d16)
    dsub = d * _f(sc8.view(np.int8).astype(np.int64))
    L = _requant(blocks, L.T.reshape(nb, 256), dsub, np.zeros_like(dsub), -32, 31, 16, 32)
    c = L.reshape(nb, 2, 4, 32)
    ql = np.concatenate(
        [(c[:, :, 0] & 0xF) | ((c[:, :, 2] & 0xF) << 4), (c[:, :, 1] & 0xF) | ((c[:, :, 3] & 0xF) << 4)],
        axis=2,
    ).reshape(nb, 128)
    qh = ((c[:, :, 0] >> 4) | ((c[:, :, 1] >> 4) << 2) | ((c[:, :, 2] >> 4) << 4) | ((c[:, :, 3] >> 4) << 6))
    out = np.hstack([_u8(ql), _u8(qh.reshape(nb, 64)), sc8, d16])
    out[~live] = 0  # memset of an all-zero super-block
    return out


# type -> packer(blocks, imp=None, x=None); the same function serves both paths (imp selects the imatrix one)
K_PACKERS = {"Q6_K": _q6_K, "Q5_K": _q5_K, "Q4_K": _q4_K, "Q3_K": _q3_K, "Q2_K": _q2_K}
