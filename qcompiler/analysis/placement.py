"""Where int8 activations pay in ONNX Runtime: which layers its CPU provider runs as integer kernels.

A quantized activation costs a `QuantizeLinear` and a `DequantizeLinear` pass over the tensor; it
pays only when the layer reading it runs as an integer kernel. ONNX Runtime (1.32, CPU, checked
on the graphs it optimizes) makes one of a QDQ group when:

- `DQ(x) -> MatMul <- DQ(W)`: always (`MatMulIntegerToFloat`; `lower-ort` writes that op itself
  when an `Add` of a constant bias follows, the bias of any shape that broadcasts as a row);
- `DQ(x) -> Conv <- DQ(W)` (a float bias is fine): only when the Conv's output, or the output of a
  `Relu` or `Clip(0, max)` (ReLU6) that alone reads it, goes to a single `QuantizeLinear`
  (`QLinearConv`; ONNX Runtime drops the `Relu` or `Clip` when the quantized range lies within its
  bounds, which the range calibrated after it does). Without it the Conv runs in float behind a
  dequantize: slower than no quantization at all.

- `DQ(x) -> ConvTranspose <- DQ(W)` (1D to 3D, any group count, int8 or uint8 activations): never;
  ONNX Runtime 1.32's CPU provider has no integer ConvTranspose and runs it in float behind the
  dequantize (`tests/test_quantize_conv.py` holds it to that).
- a Conv in 3D fuses like a 2D one, but ONNX Runtime's integer 3D kernel gathers the input tap by
  tap and runs about as fast as the float Conv at 16 input channels, slower below (`benchmarks/
  conv3d_integer.py` before commit 6d72b7b: 3.0x float32 with 4 input channels, 1.7x with 8, 1.1x
  with 16, 3^3 kernels). `lower-ort` therefore writes an integer 3D Conv with more than one tap as a
  2D Conv over the output's depth slices where it can (`unfolds_to_2d`; passes/lower_ort/conv3d.py),
  which runs on the integer 2D kernel. Measured so (`benchmarks/conv3d_integer.py`, 2 threads, int8 /
  float32 time, 3^3 kernels; benchmarks/results/conv3d_integer.json): 0.26 to 0.44 from 16 to 128
  input channels, 0.58 for 8 -> 16 channels, 0.63 for 32 -> 8, 0.67 for 4 -> 16, 0.89 for 8 -> 8,
  0.55 for a 1 -> 16 7^3 stride-2 stem, but 1.32 for 2 -> 16 (54 products an output) and 1.42 for
  1 -> 16 (27). So a 3D Conv with more than one tap stays float when each output sums fewer than
  `MIN_CONV3D_PRODUCTS` products (input channels per group x taps), or, where `lower-ort` cannot write
  it in 2D (an `auto_pad`, or its input's channels, depth, height or width unknown at compile time),
  when it reads fewer than `MIN_CONV3D_CHANNELS` input channels per group.

A quantized Conv output that a float activation reads (a Swish's `QuickGelu`, a `HardSwish`, a
squeeze-and-excitation's `Sigmoid`) costs a dequantize before the activation and a quantize after
it; where the Conv sums few products an output (a depthwise or narrow 1x1 Conv: fewer than
`CHEAP_CONV_PRODUCTS`), that round trip costs about what its integer kernel saves. Measured
(`benchmarks/placement.py`, the trial conv nets of docs/measurement.md, 2 threads): MobileNetV3 with 18
such activations behind 39 integer kernels ran 1.1 to 1.5x float; EfficientNet-style nets with 10 of
13 and 41 of 52, 0.9 to 1.05x; nets with none to 16 % (RegNet's gates, a hard-swish behind 3x3 Convs
of 64 channels) 0.4 to 0.76x. So `predicted_slower` also says so when such activations are at least
`FLOAT_ACTIVATION_SHARE` of the integer kernels (a rule of thumb: a MobileViT, 25 of 90 and 1.17x,
escapes it).

`quantize` therefore quantizes the output of every Conv it quantizes (`quantized_conv_outputs`:
readers that are no layer read it dequantized, as ONNX Runtime's own `quantize_static` places it),
and leaves in float the layers `integer_layers` names;
`census` counts what a lowered graph will run (`lower-ort`'s statistics and slowdown warning).
"""

from __future__ import annotations

import math

import onnx_ir as ir

MIN_CONV3D_PRODUCTS = 64
MIN_CONV3D_CHANNELS = 16
CHEAP_CONV_PRODUCTS = 256  # products an output below which a Conv saves about what a float activation's round trip costs
FLOAT_ACTIVATION_SHARE = 0.4  # such round trips per integer kernel from which the artifact is predicted no faster than float
FLOAT_ACTIVATIONS = frozenset({"Sigmoid", "HardSigmoid", "HardSwish", "QuickGelu", "Tanh", "Gelu", "Erf", "Softplus", "Mish",
                               "Elu", "Selu", "Exp", "LeakyRelu"})
NO_INTEGER_CONV_TRANSPOSE = ("ONNX Runtime's CPU provider has no integer ConvTranspose: a quantized one runs in float "
                             "behind a dequantize")


def _is(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def folds_into_integer_conv(node: ir.Node) -> bool:
    """A `Relu`, or a `Clip` from 0 to a constant bound (ReLU6): ONNX Runtime removes it between a
    Conv and a `QuantizeLinear` whose range lies within its bounds, and fuses the three into one
    `QLinearConv`. Quantizing its output rather than the Conv's keeps the int8 grid on the range the
    next layer reads ([0, 6] for ReLU6, not the Conv's far wider range before the clip)."""
    if _is(node, "Relu"):
        return True
    if not _is(node, "Clip") or len(node.inputs) < 2:
        return False
    low = node.inputs[1].const_value if node.inputs[1] is not None else None
    high = node.inputs[2].const_value if len(node.inputs) > 2 and node.inputs[2] is not None else None
    return low is not None and low.size == 1 and float(low.numpy().reshape(())) == 0.0 and \
        (len(node.inputs) < 3 or node.inputs[2] is None or (high is not None and high.size == 1))


def conv_output(graph: ir.Graph, conv: ir.Node) -> ir.Value:
    """The tensor an integer Conv's output Q would read: its output, or that of a `Relu` or
    `Clip(0, max)` that alone reads it."""
    out = conv.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and uses[0].idx == 0 and folds_into_integer_conv(uses[0].node) and out not in graph.outputs:
        return uses[0].node.outputs[0]
    return out


def integer_layers(graph: ir.Graph, layers: list[ir.Node], static: bool) -> dict[int, str]:
    """For `layers` (MatMul and Conv nodes that would read a quantized activation): the ids of those
    ONNX Runtime would run in float, each with the reason. A MatMul always runs integer. A Conv runs
    integer when its output is quantized too, which `quantize` does for every Conv it quantizes
    (`quantized_conv_outputs`): so only a Conv whose output is a graph output (which stays float),
    or any Conv with a run-time (dynamic) activation scale, stays float; a ConvTranspose always does."""
    floats: dict[int, str] = {}
    for node in layers:
        if _is(node, "ConvTranspose"):
            floats[id(node)] = NO_INTEGER_CONV_TRANSPOSE
            continue
        if not _is(node, "Conv"):
            continue
        if not static:
            floats[id(node)] = "a Conv with a run-time (dynamic) activation scale has no integer kernel in ONNX Runtime"
        elif (narrow := narrow_conv3d(node)) is not None:
            floats[id(node)] = narrow
        elif conv_output(graph, node) in graph.outputs:
            floats[id(node)] = ("its output is a graph output, which stays float, and ONNX Runtime's integer Conv "
                                "(QLinearConv) needs a quantized output: it would run in float behind a dequantize")
    return floats


def unfolds_to_2d(conv: ir.Node, kernel: tuple, x_shape) -> bool:
    """Whether `lower-ort` writes this 3D Conv (its kernel's shape [O, C/g, kd, kh, kw], its input's shape)
    as a 2D Conv over its output's depth slices once it is an integer one: a kernel of more than one tap or
    a depth stride, explicit padding, and the input's channels, depth, height and width known."""
    stride = conv.attributes["strides"].as_ints()[0] if "strides" in conv.attributes else 1
    auto_pad = conv.attributes["auto_pad"].as_string() if "auto_pad" in conv.attributes else "NOTSET"
    return (tuple(kernel[2:]) != (1, 1, 1) or stride != 1) and auto_pad in ("NOTSET", "") and x_shape is not None \
        and len(x_shape) == 5 and all(isinstance(d, int) for d in list(x_shape)[1:])


def narrow_conv3d(conv: ir.Node) -> str | None:
    """Why a 3D Conv with more than one tap stays float: in 2D over depth slices (`unfolds_to_2d`), each output
    sums fewer than `MIN_CONV3D_PRODUCTS` products; as a 3D integer kernel, it reads fewer than
    `MIN_CONV3D_CHANNELS` input channels per group. None where its integer kernel pays."""
    shape = _kernel_shape(conv)
    if shape is None or len(shape) != 5:
        return None
    taps = shape[2] * shape[3] * shape[4]
    if taps == 1:
        return None
    if unfolds_to_2d(conv, tuple(shape), conv.inputs[0].shape):
        products = shape[1] * taps
        return None if products >= MIN_CONV3D_PRODUCTS else (
            f"a 3D Conv summing {products} products an output (input channels per group x taps, below "
            f"{MIN_CONV3D_PRODUCTS}): ONNX Runtime's integer kernel runs it slower than the float Conv")
    return None if shape[1] >= MIN_CONV3D_CHANNELS else (
        f"a 3D Conv with {shape[1]} input channel{'s' * (shape[1] != 1)} per group (below {MIN_CONV3D_CHANNELS}) that "
        "lower-ort cannot write in 2D (auto_pad, or input dims unknown at compile time): ONNX Runtime's integer 3D "
        "kernel gathers its input tap by tap and runs slower than the float Conv")


def quantized_conv_outputs(graph: ir.Graph, layers: list[ir.Node]) -> dict[str, ir.Value]:
    """The tensors to quantize after the Convs among `layers` so that each makes a `QLinearConv`:
    each Conv's output, or that of the `Relu` or `Clip(0, max)` alone reading it (graph outputs excepted)."""
    found: dict[str, ir.Value] = {}
    for node in layers:
        if _is(node, "Conv"):
            out = conv_output(graph, node)
            if out not in graph.outputs:
                found.setdefault(out.name, out)
    return found


def census(graph: ir.Graph) -> dict[str, object]:
    """What ONNX Runtime will run of a lowered graph: integer kernels, layers that read a
    dequantized activation but run in float (each a wasted quantize and dequantize), and float
    activations that read a cheap integer Conv's dequantized output (`cheap_conv_round_trip`)."""
    integer, wasted, activations = 0, [], []
    for node in graph:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if (domain, node.op_type) == ("com.microsoft", "MatMulIntegerToFloat") or (domain, node.op_type) in (("", "QLinearConv"), ("", "QLinearMatMul")):
            integer += 1
            continue
        if node.op_type in FLOAT_ACTIVATIONS and domain in ("", "com.microsoft") and cheap_conv_round_trip(node):
            activations.append(node.name or node.outputs[0].name)
            continue
        if domain or node.op_type not in ("MatMul", "Conv") or not node.inputs or node.inputs[0] is None:
            continue
        x = node.inputs[0].producer()
        if not _is(x, "DequantizeLinear") or x.inputs[0] is None or x.inputs[0].const_value is not None:
            continue
        if node.op_type == "MatMul" or _output_quantized(graph, node):
            integer += 1
        else:
            wasted.append(node.name or node.outputs[0].name)
    return {"integer_kernels": integer, "float_kernels_behind_qdq": len(wasted), "float_kernels_behind_qdq_names": wasted[:8],
            "float_activations_behind_qdq": len(activations), "float_activations_behind_qdq_names": activations[:8]}


def cheap_conv_round_trip(node: ir.Node) -> bool:
    """`node` (a float activation) reads `DequantizeLinear(QuantizeLinear(y))` where `y` is the output
    of a Conv (or of a Relu or Clip alone reading one) that sums fewer than `CHEAP_CONV_PRODUCTS`
    products an output (input channels per group x taps, from its kernel's shape)."""
    x = node.inputs[0] if node.inputs else None
    dequantize = x.producer() if x is not None else None
    if not _is(dequantize, "DequantizeLinear") or dequantize.inputs[0] is None:
        return False
    quantize = dequantize.inputs[0].producer()
    if not _is(quantize, "QuantizeLinear") or not quantize.inputs or quantize.inputs[0] is None:
        return False
    conv = quantize.inputs[0].producer()
    if conv is not None and folds_into_integer_conv(conv) and conv.inputs[0] is not None:
        conv = conv.inputs[0].producer()
    if not _is(conv, "Conv") or len(conv.inputs) < 2 or conv.inputs[1] is None or conv.inputs[0] is None \
            or not _is(conv.inputs[0].producer(), "DequantizeLinear"):  # an integer Conv: it reads a dequantized input
        return False
    shape = _kernel_shape(conv)
    return shape is not None and len(shape) >= 3 and math.prod(shape[1:]) < CHEAP_CONV_PRODUCTS


def _kernel_shape(conv: ir.Node) -> tuple[int, ...] | None:
    """A Conv's kernel shape [O, C/groups, k...] where known: its weight's, or (lowered) that of the codes its
    `DequantizeLinear` reads; None where a dim is unknown."""
    w = conv.inputs[1] if len(conv.inputs) > 1 else None
    if w is not None and w.const_value is None and w.shape is None and _is(w.producer(), "DequantizeLinear"):
        w = w.producer().inputs[0]
    shape = None if w is None else (w.const_value.shape if w.const_value is not None else w.shape)
    return tuple(shape) if shape is not None and all(isinstance(d, int) for d in shape) else None


def _output_quantized(graph: ir.Graph, conv: ir.Node) -> bool:
    out = conv_output(graph, conv)
    uses = list(out.uses())
    return out not in graph.outputs and len(uses) == 1 and _is(uses[0].node, "QuantizeLinear")


def predicted_slower(counts: dict) -> bool:
    """Predicted slower than float (or no faster): at least as many quantized activations feed float
    kernels as integer kernels run (a rule of thumb: `benchmarks/placement.py`'s conv net placed that
    way, 4 float Convs behind a dequantize against 3 integer kernels, ran 1.26 times as long as
    float), or float activations read cheap integer Convs' outputs at least `FLOAT_ACTIVATION_SHARE`
    times as often as integer kernels run (the module docstring)."""
    wasted, integer = counts["float_kernels_behind_qdq"], counts["integer_kernels"]
    activations = counts.get("float_activations_behind_qdq", 0)
    return (wasted > 0 and wasted >= integer) or (activations > 0 and activations >= FLOAT_ACTIVATION_SHARE * integer)
