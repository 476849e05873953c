"""A target's cost model: what `allocate-bits` prices (stored bits per target; measured kernel time
with cost=latency)."""

import numpy as np
import pytest

from qcompiler.analysis import bitcost
from qcompiler.analysis.probe import synthetic_inputs
from qcompiler.codegen.targets import get_target
from qcompiler.codegen.triton.cost import TRITON, TritonStorageCost
from qcompiler.codegen.triton.reference import MIXED_KINDS
from qcompiler.errors import UserError
from qcompiler.ir import parse
from qcompiler.pipeline.context import CompileContext, using
from qcompiler.pipeline.pass_manager import run_pipeline
from qcompiler.pipeline.spec import format_pipeline, parse_pipeline
from qcompiler.tools.opt import optimize


def _layer(k=512, n=128, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (k, n)).astype(np.float32)
    w[rng.choice(k, 8, replace=False)] *= 10
    values = ",".join(f"{v:.5f}" for v in w.ravel())
    return parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[M, {k}] X) => (float[M, {n}] Y)
    <float[{k},{n}] W = {{{values}}}>
    {{ Y = MatMul (X, W) }}""")


def _allocate(options: str, cost_model=None) -> dict:
    model = _layer()
    data = [synthetic_inputs(model, seed=s) for s in range(4)]
    with using(CompileContext(calibration=data, cost_model=cost_model)):
        records = run_pipeline(model, parse_pipeline(f"calibrate,allocate-bits{{{options}}}"))
    return records[-1].stats


def _table(per_weight_ns: dict, per_class_us: float) -> bitcost.StorageCost:
    routes = {"nbits2": 0.01, "nbits4": 0.01, "nbits8": 0.01, "fp16": 0.1, "float32": 0.1} | per_weight_ns
    return bitcost.StorageCost(bitcost.KernelCosts("ort", routes, per_class_us))


def test_cost_option_parses_and_prints_back():
    assert "cost=bits" in format_pipeline(parse_pipeline("allocate-bits"))
    assert "cost=latency" in format_pipeline(parse_pipeline("allocate-bits{cost=latency}"))
    with pytest.raises(UserError, match="cost"):
        parse_pipeline("allocate-bits{cost=speed}")


def test_latency_without_a_kernel_table_is_refused_naming_the_target():
    with pytest.raises(UserError, match="target 'triton' has none; use cost=bits"):
        _allocate("cost=latency", TritonStorageCost())
    with pytest.raises(UserError, match="target 'ort' has none"):
        _allocate("cost=latency", bitcost.StorageCost())


def test_each_target_brings_its_cost_model():
    ort = get_target("ort").cost_model
    assert ort.name == "ort" and {"nbits2", "nbits4", "nbits8"} <= set(ort.kernel_costs.per_weight_ns)
    assert ort.kernel_costs.per_class_us >= 0 and all(v > 0 for v in ort.kernel_costs.per_weight_ns.values())
    triton = get_target("triton").cost_model
    assert triton.name == "triton" and triton.kernel_costs.target == "triton"
    assert triton.class_bits("uniform", 3, 100, 64, 32, "auto") == TRITON.class_bits("uniform", 3, 100, 64, 32, "auto")


def test_the_triton_table_prices_every_route_its_mixed_kernel_runs():
    table = get_target("triton").cost_model.kernel_costs
    routes = {TRITON.route(kind, bits, "auto") for kind, bits in MIXED_KINDS}
    assert routes == set(table.per_weight_ns) and all(v > 0 for v in table.per_weight_ns.values())
    assert table.per_class_us >= 0 and table.source["device"]


def test_latency_on_the_triton_target_allocates_within_the_budget():
    stats = _allocate("avg-bits=3.25 cost=latency", get_target("triton").cost_model)
    assert stats["per_layer"]["Y"]["predicted_us"] > 0 and stats["predicted_bits_per_weight"] <= 3.25


def test_ort_prices_are_the_bitcost_functions():
    for kind, bits in (("uniform", 2), ("uniform", 3), ("uniform", 4), ("codebook", 3), ("fp16", 16)):
        for zp in ("auto", "integer", "fractional"):
            assert bitcost.ORT.class_bits(kind, bits, 300, 64, 128, zp) == bitcost.class_bits(kind, bits, 300, 64, 128, zp)


def test_triton_prices_what_its_package_stores():
    from qcompiler.codegen.triton.reference import pack_tight

    n, g = 64, 128
    for bits, rows in ((1, 7), (2, 512), (3, 300), (4, 200), (5, 33), (8, 130)):
        stored = pack_tight(np.ones((rows, n), np.int64), bits)
        scale_zero = 2 * 16 * n * -(-rows // g)
        assert TRITON.class_bits("uniform", bits, rows, n, g, "auto") == 8 * stored.nbytes + scale_zero
    # no K-tile padding is stored: a 2-bit class of 100 rows costs 2 bits a code, not 512 rows of words
    assert TRITON.class_bits("uniform", 2, 100, n, g, "auto") == 2 * 100 * n + 2 * 16 * n
    # a 3-bit code costs 3 bits in the package, 4 bits (a container) in ONNX Runtime's MatMulNBits
    assert TRITON.per_row_bits(3, n, g, False, "integer") == 3 * n + 2 * 16 * n / g < bitcost.ORT.per_row_bits(3, n, g, False, "integer")


def test_allocation_for_triton_holds_its_budget_in_its_prices():
    stats = _allocate("avg-bits=3.25", TRITON)
    layer = next(iter(stats["per_layer"].values()))
    assert stats["predicted_bits_per_weight"] <= 3.25
    assert layer["stored_bits"] != _allocate("avg-bits=3.25")["per_layer"]["Y"]["stored_bits"]


def test_latency_drops_a_class_whose_launch_outweighs_its_error():
    bits = _allocate("avg-bits=4.5 outliers-act=0 outliers-weight=0")
    assert len(bits["per_layer"]["Y"]["bits_histogram"]) > 1
    slow_launch = _table({}, per_class_us=1e5)
    fast = _allocate("avg-bits=4.5 outliers-act=0 outliers-weight=0 cost=latency", slow_launch)
    layer = fast["per_layer"]["Y"]
    assert list(layer["bits_histogram"]) == [4] and fast["predicted_bits_per_weight"] <= 4.5
    assert layer["predicted_us"] == pytest.approx(1e5 + 0.01 * 512 * 128 / 1000)
    assert layer["predicted_error"] > bits["per_layer"]["Y"]["predicted_error"]


def test_latency_avoids_a_slow_width_and_keeps_the_budget():
    bits = _allocate("avg-bits=4.5 outliers-act=0 outliers-weight=0")
    assert 8 in bits["per_layer"]["Y"]["bits_histogram"]
    slow_eight = _table({"nbits8": 100.0}, per_class_us=0.0)
    fast = _allocate("avg-bits=4.5 outliers-act=0 outliers-weight=0 cost=latency", slow_eight)
    assert 8 not in fast["per_layer"]["Y"]["bits_histogram"] and fast["predicted_bits_per_weight"] <= 4.5
    # a table that charges every weight alike leaves error alone to decide: the full candidate set is
    # one of the sets tried, so the error is at most what cost=bits predicts
    even = _allocate("avg-bits=4.5 outliers-act=0 outliers-weight=0 cost=latency", _table({}, per_class_us=0.0))
    assert even["predicted_error"] <= bits["predicted_error"] and even["predicted_bits_per_weight"] <= 4.5


def test_kmeans_fills_the_budget_past_a_codebook_table_it_cannot_pay_for():
    # 512 x 128: a 4-bit codebook class's first row pays 128 x 16 fp16 centroids (0.5 bits per weight),
    # more than the room left above the 2-bit classes at 3 and 3.25 bits; rows then go to 8 bits past it
    for avg in (3.0, 3.25):
        uniform = _allocate(f"avg-bits={avg}")
        kmeans = _allocate(f"avg-bits={avg} codebook=kmeans")
        assert avg - 0.15 <= kmeans["predicted_bits_per_weight"] <= avg, avg
        assert abs(kmeans["predicted_bits_per_weight"] - uniform["predicted_bits_per_weight"]) <= 0.05, avg
        assert 8 in kmeans["per_layer"]["Y"]["bits_histogram"]
    # where the 4-bit table fits, the codebook class is still chosen when it predicts less error
    wide = _allocate("avg-bits=4 codebook=kmeans")
    assert 4 in wide["per_layer"]["Y"]["bits_histogram"] and 4 - 0.15 <= wide["predicted_bits_per_weight"] <= 4


def test_opt_prices_with_the_shipped_ort_table():
    model = _layer()
    records = optimize(model, "calibrate,allocate-bits{avg-bits=3.25 cost=latency}")
    layer = records[-1].stats["per_layer"]["Y"]
    assert layer["predicted_us"] > 0 and records[-1].stats["predicted_bits_per_weight"] <= 3.25


def _lower_auto(cost_model) -> str:
    """The route `lower-ort{mixed-route=auto}` takes for the 512x128 layer at 3.5 bits (2- and 4-bit classes)."""
    model = _layer()
    data = [synthetic_inputs(model, seed=s) for s in range(4)]
    with using(CompileContext(calibration=data, cost_model=cost_model)):
        records = run_pipeline(model, parse_pipeline("calibrate,allocate-bits{avg-bits=3.5 outliers-act=0 outliers-weight=0},"
                                                     "quantize-weights,lower-ort{mixed-route=auto}"))
    (route,) = records[-1].stats["routes"]
    assert [n.op_type for n in model.graph].count("MatMulNBits") == (1 if route.startswith("digits") else route.count("MatMulNBits"))
    return route


def test_auto_route_takes_one_kernel_where_the_table_predicts_calls_cost_more_than_weights():
    """mixed-route=auto: digits (one kernel, the 4-bit class as 2-bit digits: more weight time)
    where a class's fixed cost outweighs the extra rows, split where it does not."""
    assert _lower_auto(_table({}, per_class_us=1e5)).startswith("digits: MatMulNBits2(one kernel: 2,4-bit")
    assert _lower_auto(_table({}, per_class_us=0.0)).startswith("split: MatMulNBits2 + MatMulNBits4")
    # the shipped table: a 512 x 128 layer is small enough that three calls cost more than the extra rows
    assert _lower_auto(get_target("ort").cost_model).startswith("digits: ")
    with pytest.raises(UserError, match="mixed-route=auto needs the target's measured kernel-cost table"):
        _lower_auto(bitcost.StorageCost())
