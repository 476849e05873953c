# ---- runtime: ONNX operators in torch, with ONNX's semantics (copied verbatim into model.py) ----
#
# Tensors that hold shapes (the output of Shape and small integer constants) stay on the CPU, so
# that computing a shape never waits for the GPU; an operator that meets a CPU tensor and a GPU
# tensor moves the CPU one across. Floating-point results take the package's compute dtype.

import math as _math

import torch


class PackageError(ValueError):
    """Bad input to this package (a weight file that disagrees with the manifest, a missing input)."""


# ---- codes: stored tight, read by the kernels as k-strided int32 words ----

_CODES_PER_WORD = {2: 16, 3: 10, 4: 8, 8: 4}
_PACK_ROWS = 32


def code_words(stream, segments, columns):
    """The int32 words a kernel reads (`reference.pack_codes` of each segment, stacked along K) from
    codes stored as tight bit streams (`reference.pack_tight`, one a segment, concatenated), built
    once at load. `segments`: [stored bits, kernel width, rows] of each."""
    parts, offset = [], 0
    for bits, width, rows in segments:
        count = rows * columns
        size = (count * bits + 7) // 8
        if offset + size > stream.numel():
            raise PackageError("a weight's stored codes are shorter than manifest.json says; re-emit the package")
        codes = _unpack_tight(stream[offset:offset + size], bits, count).reshape(rows, columns)
        parts.append(_k_strided(codes, width))
        offset += size
    if offset != stream.numel():
        raise PackageError("a weight's stored codes are longer than manifest.json says; re-emit the package")
    return torch.cat(parts) if parts else torch.zeros((0, columns), dtype=torch.int32)


def _unpack_tight(stream, bits, count):
    """Codes of `bits` bits from a little-endian bit stream, `count` of them, as int64."""
    out = torch.empty(count, dtype=torch.int64)
    shifts = torch.arange(8, dtype=torch.uint8)
    weights = 1 << torch.arange(bits, dtype=torch.int64)
    chunk = 1 << 20  # codes at a time (a multiple of 8: every chunk starts on a byte)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        raw = stream[start * bits // 8:(start * bits + n * bits + 7) // 8]
        planes = ((raw[:, None] >> shifts) & 1).reshape(-1)[:n * bits].reshape(n, bits).to(torch.int64)
        out[start:start + n] = (planes * weights).sum(1)
    return out


def _k_strided(codes, width):
    """`reference.pack_codes`: code i of word (tile t, row r) is K row t*C*32 + i*32 + r, K padded with 0."""
    c, r = _CODES_PER_WORD[width], _PACK_ROWS
    rows, n = codes.shape
    tile = c * r
    kp = -(-rows // tile) * tile
    padded = torch.zeros((kp, n), dtype=torch.int64)
    padded[:rows] = codes
    q = padded.reshape(kp // tile, c, r, n)
    words = torch.zeros((kp // tile, r, n), dtype=torch.int64)
    for i in range(c):
        words |= q[:, i] << (width * i)
    words = words.reshape(kp // c, n)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


_DTYPES = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
    9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16,
}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Runtime:
    """The few things an operator needs besides its inputs: the compute dtype and device."""

    def __init__(self, device, dtype):
        self.device = torch.device(device)
        self.dtype = dtype


class _Transfers:
    """CPU -> device copies of shape-derived tensors. `record` keeps each copy made during an eager
    run; `replay` hands them out again in the same order (checking they hold the same values), so a
    forward can be captured in a CUDA graph, where copies from host memory are not allowed."""

    mode = None  # None, "record", "replay"
    log: list = []
    at = 0


def _to(t, device):
    if _Transfers.mode == "replay":
        src, dst = _Transfers.log[_Transfers.at]
        if src.shape != t.shape or src.dtype != t.dtype or not torch.equal(src, t):
            raise PackageError("a shape-derived tensor changed between the recorded run and the capture; "
                               "capture with the same input shapes")
        _Transfers.at += 1
        return dst
    dst = t.to(device, non_blocking=_Transfers.mode is None)
    if _Transfers.mode == "record":
        _Transfers.log.append((t.clone(), dst))
    return dst


def _pair(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device != b.device:
        if a.device.type == "cpu" and a.dim() > 0:
            a = _to(a, b.device)
        elif b.device.type == "cpu" and b.dim() > 0:
            b = _to(b, a.device)
    return a, b


def _ints(t):
    return [int(v) for v in t.reshape(-1).tolist()] if isinstance(t, torch.Tensor) else [int(v) for v in t]


def _axis(axis, rank):
    return axis + rank if axis < 0 else axis


def Add(a, b):
    a, b = _pair(a, b)
    return a + b


def Sub(a, b):
    a, b = _pair(a, b)
    return a - b


def Mul(a, b):
    a, b = _pair(a, b)
    return a * b


def Div(a, b):
    a, b = _pair(a, b)
    if a.dtype in _FLOATS:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def Pow(a, b):
    a, b = _pair(a, b)
    if isinstance(b, torch.Tensor) and b.dim() == 0 and b.device.type == "cpu":
        b = b.item()
    return torch.pow(a, b).to(a.dtype)


def _variadic(op, xs):
    out = xs[0]
    for x in xs[1:]:
        out, x = _pair(out, x)
        out = op(out, x)
    return out


def Max(*xs):
    return _variadic(torch.maximum, xs)


def Min(*xs):
    return _variadic(torch.minimum, xs)


def Equal(a, b):
    a, b = _pair(a, b)
    return a == b


def Less(a, b):
    a, b = _pair(a, b)
    return a < b


def Greater(a, b):
    a, b = _pair(a, b)
    return a > b


def LessOrEqual(a, b):
    a, b = _pair(a, b)
    return a <= b


def GreaterOrEqual(a, b):
    a, b = _pair(a, b)
    return a >= b


def And(a, b):
    a, b = _pair(a, b)
    return a & b


def Or(a, b):
    a, b = _pair(a, b)
    return a | b


def Not(a):
    return ~a


def Where(c, a, b):
    a, b = _pair(a, b)
    c, a = _pair(c, a)
    c, b = _pair(c, b)
    return torch.where(c, a, b)


def Neg(x):
    return -x


def Abs(x):
    return torch.abs(x)


def Sqrt(x):
    return torch.sqrt(x)


def Reciprocal(x):
    return torch.reciprocal(x)


def Exp(x):
    return torch.exp(x)


def Log(x):
    return torch.log(x)


def Tanh(x):
    return torch.tanh(x)


def Erf(x):
    return torch.erf(x)


def Sin(x):
    return torch.sin(x)


def Cos(x):
    return torch.cos(x)


def Floor(x):
    return torch.floor(x)


def Ceil(x):
    return torch.ceil(x)


def Round(x):
    return torch.round(x)  # half to even, as ONNX


def Sigmoid(x):
    return torch.sigmoid(x)


def Relu(x):
    return torch.relu(x)


def Gelu(x, approximate="none"):
    return torch.nn.functional.gelu(x, approximate=approximate)


def Identity(x):
    return x


def Softmax(x, axis=-1):
    return torch.softmax(x, dim=axis)


def LayerNormalization(x, scale, bias=None, axis=-1, epsilon=1e-5):
    axis = _axis(axis, x.dim())
    return torch.nn.functional.layer_norm(x, x.shape[axis:], scale, bias, epsilon)


def MatMul(a, b):
    a, b = _pair(a, b)
    return torch.matmul(a, b)


def Gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    a = a.t() if transA else a
    b = b.t() if transB else b
    y = alpha * (a @ b)
    return y if c is None else y + beta * c


def Cast(x, to, rt):
    dtype = _DTYPES[to]
    if dtype in _FLOATS:
        dtype = rt.dtype
    return x.to(dtype)


def Shape(x, start=0, end=None):
    dims = list(x.shape)[start:end]
    return torch.tensor(dims, dtype=torch.int64)


def Size(x):
    return torch.tensor(x.numel(), dtype=torch.int64)


def Reshape(x, shape, allowzero=0):
    dims = _ints(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def Flatten(x, axis=1):
    axis = _axis(axis, x.dim())
    return x.reshape(int(_math.prod(x.shape[:axis])), -1)


def Transpose(x, perm=None):
    perm = list(range(x.dim()))[::-1] if perm is None else list(perm)
    return x.permute(perm)


def Unsqueeze(x, axes):
    axes = sorted(_axis(a, x.dim() + len(_ints(axes))) for a in _ints(axes))
    for a in axes:
        x = x.unsqueeze(a)
    return x


def Squeeze(x, axes=None):
    if axes is None:
        return x.squeeze()
    for a in sorted((_axis(a, x.dim()) for a in _ints(axes)), reverse=True):
        x = x.squeeze(a)
    return x


def Concat(*xs, axis):
    devices = {t.device for t in xs if t.dim() > 0 or t.device.type != "cpu"}
    if len(devices) > 1:
        target = next(d for d in devices if d.type != "cpu")
        xs = [t if t.device == target else _to(t, target) for t in xs]
    return torch.cat(xs, dim=axis)


def Split(x, split=None, axis=0, num_outputs=None):
    axis = _axis(axis, x.dim())
    if split is not None:
        return tuple(torch.split(x, _ints(split), dim=axis))
    n = x.shape[axis]
    size = -(-n // num_outputs)
    return tuple(torch.split(x, size, dim=axis))


def Gather(data, indices, axis=0):
    axis = _axis(axis, data.dim())
    if indices.device != data.device:
        indices = _to(indices, data.device)
    return data[(slice(None),) * axis + (indices.long(),)]


def Slice(x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = list(range(len(starts))) if axes is None else [_axis(a, x.dim()) for a in _ints(axes)]
    steps = [1] * len(starts) if steps is None else _ints(steps)
    index = [slice(None)] * x.dim()
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        n = x.shape[a]
        if st > 0:
            s = max(0, min(n, s + n if s < 0 else s))
            e = max(0, min(n, e + n if e < 0 else e))
            index[a] = slice(s, e, st)
        else:  # negative step: slice the reversed axis
            s = max(-1, min(n - 1, s + n if s < 0 else s))
            e = max(-1, min(n - 1, e + n if e < 0 else e))
            flips.append(a)
            index[a] = slice(n - 1 - s, n - 1 - e, -st)
    if flips:
        x = torch.flip(x, flips)
    return x[tuple(index)]


def Expand(x, shape):
    dims = _ints(shape)
    rank = max(len(dims), x.dim())
    dims = [1] * (rank - len(dims)) + dims
    have = [1] * (rank - x.dim()) + list(x.shape)
    return x.reshape(have).expand([h if d == 1 else d for h, d in zip(have, dims)])


def Tile(x, repeats):
    return x.repeat(_ints(repeats))


def Range(start, limit, delta):
    s, l, d = (v.item() for v in (start, limit, delta))
    return torch.arange(s, l, d, dtype=start.dtype, device=start.device)


def ConstantOfShape(shape, value):
    value = value.reshape(())
    return torch.full(_ints(shape), value.item(), dtype=value.dtype, device=value.device)


def Trilu(x, k=None, upper=1):
    k = 0 if k is None else int(k.item())
    return torch.triu(x, k) if upper else torch.tril(x, k)


def _reduce_axes(x, axes, noop_with_empty_axes):
    if axes is None or (isinstance(axes, torch.Tensor) and axes.numel() == 0):
        return None if not noop_with_empty_axes else ()
    return [_axis(a, x.dim()) for a in _ints(axes)]


def _reduce(fn, x, axes, keepdims, noop):
    dims = _reduce_axes(x, axes, noop)
    if dims == ():
        return x
    if dims is None:
        dims = list(range(x.dim()))
    return fn(x, dims, keepdims)


def ReduceSum(x, axes=None, keepdims=1, noop_with_empty_axes=0):
    return _reduce(lambda t, d, k: torch.sum(t, dim=d, keepdim=bool(k)), x, axes, keepdims, noop_with_empty_axes)


def ReduceMean(x, axes=None, keepdims=1, noop_with_empty_axes=0):
    return _reduce(lambda t, d, k: torch.mean(t, dim=d, keepdim=bool(k)), x, axes, keepdims, noop_with_empty_axes)


def ReduceMax(x, axes=None, keepdims=1, noop_with_empty_axes=0):
    return _reduce(lambda t, d, k: torch.amax(t, dim=d, keepdim=bool(k)), x, axes, keepdims, noop_with_empty_axes)


def ReduceMin(x, axes=None, keepdims=1, noop_with_empty_axes=0):
    return _reduce(lambda t, d, k: torch.amin(t, dim=d, keepdim=bool(k)), x, axes, keepdims, noop_with_empty_axes)


def ReduceL2(x, axes=None, keepdims=1, noop_with_empty_axes=0):
    return _reduce(lambda t, d, k: torch.sqrt(torch.sum(t * t, dim=d, keepdim=bool(k))), x, axes, keepdims,
                   noop_with_empty_axes)


def Clip(x, lo=None, hi=None):
    if lo is not None:
        x = torch.maximum(x, _pair(lo, x)[0])
    if hi is not None:
        x = torch.minimum(x, _pair(hi, x)[0])
    return x


# ---- the qc ops that run outside a GEMM kernel ----


def qc_quantize_static(x, scale, zero_point, lo, hi):
    """int8 codes of a static per-tensor grid: clip(round(x / scale) + zero_point) (half to even)."""
    return torch.clamp(torch.round(x / scale) + zero_point, lo, hi).to(torch.int8)


def qc_fake_quantize(x, mode, scale, zero_point, bits):
    """What qc.QuantizeActivation computes: round to the integer grid and back, in x's dtype."""
    xf = x.float()
    if mode == "static":
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = torch.clamp(torch.round(xf / scale) + zero_point, lo, hi)
        return ((q - zero_point) * scale).to(x.dtype)
    if mode == "dynamic":
        hi = (1 << bits) - 1
        x_min = torch.clamp(xf.min(), max=0.0) if xf.numel() else xf.new_zeros(())
        x_max = torch.clamp(xf.max(), min=0.0) if xf.numel() else xf.new_zeros(())
        s = torch.where(x_max > x_min, (x_max - x_min) / hi, torch.ones_like(x_max))
        zp = torch.clamp(torch.round(-x_min / s), 0, hi)
        q = torch.clamp(torch.round(xf / s) + zp, 0, hi)
        return ((q - zp) * s).to(x.dtype)
    hi = (1 << (bits - 1)) - 1
    s = xf.abs().amax(dim=-1, keepdim=True) / hi
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (torch.clamp(torch.round(xf / s), -hi, hi) * s).to(x.dtype)


def qc_dequantize_weight(q, scale, zero_point, axis, dtype):
    shape = [1] * q.dim()
    shape[axis] = -1
    w = q.float()
    if zero_point is not None:
        w = w - zero_point.float().reshape(shape)
    return (w * scale.float().reshape(shape)).to(dtype)


def qc_channel_scale(x, scale, axis):
    shape = [1] * x.dim()
    shape[axis] = -1
    return x * scale.reshape(shape)
