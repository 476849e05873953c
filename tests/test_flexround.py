"""Block-wise learning after quantize-weights: flexround, tune-scales, the blocks they work on."""

import dataclasses

import numpy as np
import pytest

from qcompiler.analysis import execute
from qcompiler.analysis.blocks import find_blocks
from qcompiler.errors import UserError
from qcompiler.ir import parse, to_text
from qcompiler.pipeline.context import CompileContext, using
from qcompiler.pipeline.pass_manager import run_pipeline
from qcompiler.pipeline.spec import parse_pipeline

UNIFORM3 = "calibrate,allocate-bits{avg-bits=8 candidates=3 other-widths=expand group-size=32 outliers-act=0 outliers-weight=0},quantize-weights{grid=minmax}"


def _model(k=64, h=64, seed=0):
    """Two residual MLP blocks: Y = D + W4 relu(W3 D), D = X + W2 relu(W1 X)."""
    rng = np.random.default_rng(seed)

    def arr(shape, scale):
        return ",".join(f"{v:.5f}" for v in rng.normal(0, scale, shape).ravel())

    return parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[M, {k}] X) => (float[M, {k}] Y)
    <float[{k},{h}] W1 = {{{arr((k, h), 0.2)}}}, float[{h},{k}] W2 = {{{arr((h, k), 0.1)}}},
     float[{k},{h}] W3 = {{{arr((k, h), 0.2)}}}, float[{h},{k}] W4 = {{{arr((h, k), 0.1)}}}>
    {{ A = MatMul (X, W1)
       B = Relu (A)
       C = MatMul (B, W2)
       D = Add (X, C)
       E = MatMul (D, W3)
       F = Relu (E)
       G = MatMul (F, W4)
       Y = Add (D, G) }}""")


def _data(count=4, rows=64, seed=5):
    rng = np.random.default_rng(seed)
    return [{"X": rng.normal(0, 1, (rows, 64)).astype(np.float32)} for _ in range(count)]


def _run(model, pipeline, data=None):
    with using(CompileContext(calibration=data or _data())):
        return {r.name: r for r in run_pipeline(model, parse_pipeline(pipeline))}


def _with_op_the_interpreter_lacks():
    rng = np.random.default_rng(2)
    w = ",".join(f"{v:.5f}" for v in rng.normal(0, 0.2, 64 * 64))
    return parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[M, 64] X) => (float[M, 64] Y)
    <float[64,64] W1 = {{{w}}}, float[64,64] W2 = {{{w}}}>
    {{ A = MatMul (X, W1)
       B = Hardmax (A)
       Y = MatMul (B, W2) }}""")


def _error(model, reference, feeds):
    got, want = execute.run(model, feeds)["Y"], execute.run(reference, feeds)["Y"]
    return float(np.mean((got - want) ** 2))


def test_blocks_are_the_residual_regions():
    graph = _model().graph
    one = find_blocks(graph, regions=1)
    assert [b.names for b in one] == [["A", "C"], ["E", "G"]]
    assert [v.name for v in one[0].inputs] == ["X"] and [v.name for v in one[0].outputs] == ["D"]
    assert [v.name for v in one[1].inputs] == ["D"] and [v.name for v in one[1].outputs] == ["Y"]
    assert [b.names for b in find_blocks(graph, regions=2)] == [["A", "C", "E", "G"]]


def test_regions_0_is_the_whole_model():
    (block,) = find_blocks(_model().graph, regions=0)
    assert block.names == ["A", "C", "E", "G"]
    assert [v.name for v in block.inputs] == ["X"] and [v.name for v in block.outputs] == ["Y"]


def _mean_kl(model, reference, feeds):
    def log_softmax(y):
        y = y - y.max(-1, keepdims=True)
        return y - np.log(np.exp(y).sum(-1, keepdims=True))

    log_p = log_softmax(execute.run(reference, feeds)["Y"].astype(np.float64))
    log_q = log_softmax(execute.run(model, feeds)["Y"].astype(np.float64))
    return float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())


def test_end_to_end_scales_lower_the_kl_of_the_outputs():
    """tune-scales{regions=0 loss=kl}: every layer's scales learned together against the float
    model's output distribution (Y read as logits over its 64 columns)."""
    rtn, learned = _model(), _model()
    _run(rtn, UNIFORM3)
    stats = _run(learned, f"{UNIFORM3},tune-scales{{regions=0 loss=kl steps=60 lr=0.003 batch=2}}")["tune-scales"].stats
    (block,) = stats["per_block"]
    assert block["kept"] == "learned" and block["steps"] == 60 and block["relative_error_before"] is None
    assert block["loss_after"] < 0.8 * block["loss_before"]
    feeds = _data(count=1, seed=99)[0]  # not calibration data
    assert _mean_kl(learned, _model(), feeds) < _mean_kl(rtn, _model(), feeds)


@pytest.mark.parametrize("pass_", ["flexround{steps=40 regions=1}", "tune-scales{steps=40 regions=1 lr=0.003}"])
def test_learning_lowers_every_block_loss_and_the_output_error(pass_):
    rtn, learned = _model(), _model()
    _run(rtn, UNIFORM3)
    records = _run(learned, f"{UNIFORM3},{pass_}")
    stats = records[pass_.split("{")[0]].stats
    assert stats["blocks"] == 2 and stats["layers"] == 4
    for block in stats["per_block"]:
        assert block["kept"] == "learned" and block["steps"] == 40
        # flexround moves codes as well as scales; tune-scales only scales: a smaller gain
        assert block["loss_after"] < (0.9 if pass_.startswith("flexround") else 0.97) * block["loss_before"]
    feeds = _data(count=1, seed=99)[0]  # not calibration data
    assert _error(learned, _model(), feeds) < _error(rtn, _model(), feeds)


def test_flexround_changes_codes_and_tune_scales_keeps_them():
    base, flex, scales = _model(), _model(), _model()
    _run(base, UNIFORM3)
    _run(flex, f"{UNIFORM3},flexround{{steps=30 regions=1}}")
    _run(scales, f"{UNIFORM3},tune-scales{{steps=30 regions=1}}")

    def arrays(model, suffix):
        return {k: v.const_value.numpy() for k, v in model.graph.initializers.items() if k.endswith(suffix)}

    codes, scale, zero = "uniform.0", "uniform.1", "uniform.2"
    assert any(not np.array_equal(a, b) for a, b in zip(arrays(base, codes).values(), arrays(flex, codes).values()))
    assert all(np.array_equal(a, b) for a, b in zip(arrays(base, codes).values(), arrays(scales, codes).values()))
    assert any(not np.array_equal(a, b) for a, b in zip(arrays(base, scale).values(), arrays(scales, scale).values()))
    # 3-bit classes store fractional (fp16) zero points: tune-scales learns them too
    assert all(a.dtype == np.float16 for a in arrays(scales, zero).values())
    assert any(not np.array_equal(a, b) for a, b in zip(arrays(base, zero).values(), arrays(scales, zero).values()))


def test_codebook_entries_are_tuned():
    base, tuned = _model(), _model()
    pipeline = "calibrate,allocate-bits{avg-bits=8 candidates=3 group-size=32 codebook=kmeans outliers-act=0 outliers-weight=0},quantize-weights"
    _run(base, pipeline)
    stats = _run(tuned, f"{pipeline},flexround{{steps=40 regions=1}}")["flexround"].stats
    assert stats["classes"]["codebook_entries_tuned"] == 4 and stats["classes"]["uniform_learned"] == 0
    assert stats["loss_after"] < stats["loss_before"]


def test_same_seed_same_ir_and_lowering_unchanged():
    import torch

    a, b = _model(), _model()
    _run(a, f"{UNIFORM3},flexround{{steps=20 regions=1 seed=3}},lower-ort")
    _run(b, f"{UNIFORM3},flexround{{steps=20 regions=1 seed=3}},lower-ort")
    assert to_text(a) == to_text(b)
    assert not torch.are_deterministic_algorithms_enabled()  # the pass's deterministic kernels end with it


def test_lowered_model_computes_the_learned_ir():
    model = _model()
    _run(model, f"{UNIFORM3},flexround{{steps=20 regions=1}}")
    feeds = _data(count=1, seed=42)[0]
    expected = execute.run(model, feeds)["Y"]
    _run(model, "lower-ort")
    np.testing.assert_allclose(execute.run(model, feeds)["Y"], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [("steps=0", "steps must be"), ("steps=1000000", "steps must be"), ("lr=0", "lr must be"), ("lr=2", "lr must be"),
     ("time-budget=-1", "time-budget must be"), ("regions=-1", "regions must be"),
     ("regions=1 loss=kl", "loss=kl .* needs regions=0")],
)
def test_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        parse_pipeline(f"{UNIFORM3},flexround{{{options}}}")


def test_time_budget_shorter_than_one_step():
    with pytest.raises(UserError, match="shorter than one learning step"):
        _run(_model(), f"{UNIFORM3},flexround{{steps=10 regions=1 time-budget=0.000001}}")


def test_no_float_reference():
    """A quantized IR read back from text has lost the float weights: nothing to compare blocks with."""
    model = _model()
    _run(model, UNIFORM3)
    reread = parse(to_text(model, elide_over=None))
    with pytest.raises(UserError, match="no float weight"):
        _run(reread, "flexround{steps=5}")


def test_rebatch_never_mixes_calibration_batches():
    from qcompiler.analysis.reconstruct import _rebatch

    batches = [{"ids": np.zeros((3, 5), np.int64)}, {"ids": np.ones((2, 7), np.int64)}]
    out = _rebatch(batches, 2)
    assert [b["ids"].shape for b in out] == [(2, 5), (1, 5), (2, 7)]


def test_block_loss_leaves_padding_positions_out():
    import torch

    from qcompiler.analysis.reconstruct import _mse, _token_positions

    mask = np.array([[1, 1, 0], [1, 0, 0]], np.int64)
    valid = _token_positions({"input_ids": np.zeros((2, 3), np.int64), "attention_mask": mask})
    target = torch.zeros(2, 3, 4)
    output = target.clone()
    output[0, 2] = 100.0  # a padding position moved far
    assert float(_mse({"y": output}, {"y": target}, ["y"], valid)) == 0.0
    output[1, 0] = 2.0  # a token position moved
    assert float(_mse({"y": output}, {"y": target}, ["y"], valid)) == pytest.approx(4.0 / 3.0)
    assert float(_mse({"y": output}, {"y": target}, ["y"])) > 100.0
    assert _token_positions({"attention_mask": np.ones((2, 3), np.int64)}) is None


def _tiny_lm(vocab=48, dim=32, seed=1):
    """Token ids -> embedding table -> one residual MLP -> head: logits over the table's vocabulary."""
    rng = np.random.default_rng(seed)

    def arr(shape, scale):
        return ",".join(f"{v:.5f}" for v in rng.normal(0, scale, shape).ravel())

    return parse(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (int64[B, T] ids) => (float[B, T, {vocab}] logits)
    <float[{vocab},{dim}] E = {{{arr((vocab, dim), 1.0)}}}, float[{dim},{dim}] W1 = {{{arr((dim, dim), 0.2)}}},
     float[{dim},{dim}] W2 = {{{arr((dim, dim), 0.2)}}}, float[{dim},{vocab}] H = {{{arr((dim, vocab), 0.2)}}}>
    {{ X = Gather (E, ids)
       A = MatMul (X, W1)
       R = Relu (A)
       C = MatMul (R, W2)
       D = Add (X, C)
       logits = MatMul (D, H) }}""")


def _token_data(count=4, vocab=48):
    rng = np.random.default_rng(7)
    return [{"ids": rng.integers(0, vocab, (2, 16)).astype(np.int64)} for _ in range(count)]


def test_token_logits_are_an_output_as_long_as_a_looked_up_vocabulary():
    from qcompiler.ir.layers import outputs_token_logits

    assert outputs_token_logits(_tiny_lm().graph)
    assert not outputs_token_logits(_model().graph)  # float[M, 64] from a float input: no table looked up
    assert not outputs_token_logits(_encoder().graph)


def _encoder():
    """A table looked up, but the output is the hidden state (32 wide), not logits over the 48 tokens."""
    return parse("""<ir_version: 10, opset_import: ["" : 21]>
    g (int64[B, T] ids) => (float[B, T, 32] hidden)
    <float[48,32] E = {""" + ",".join(["0.1"] * 48 * 32) + """}>
    { hidden = Gather (E, ids) }""")


def test_first_output_token_logits_learns_in_an_lm_and_leaves_other_models_as_they_are(caplog):
    """tune-scales{first-output=token-logits} (the mixed preset's tuning=auto): learns against the
    next-token distributions of a model whose first output is logits over its vocabulary; a model
    with any other first output is left as quantize-weights wrote it, and says why."""
    e2e = "tune-scales{regions=0 loss=kl steps=30 lr=0.003 batch=2 first-output=token-logits}"
    lm, lm_rtn = _tiny_lm(), _tiny_lm()
    _run(lm_rtn, UNIFORM3, _token_data())
    stats = _run(lm, f"{UNIFORM3},{e2e}", _token_data())["tune-scales"].stats
    assert stats["per_block"][0]["kept"] == "learned"
    assert to_text(lm, elide_over=None) != to_text(lm_rtn, elide_over=None)

    other, other_rtn = _model(), _model()
    _run(other_rtn, UNIFORM3)
    from qcompiler.passes import tune_scales

    with caplog.at_level("INFO", logger=tune_scales.log.name):  # whatever level an earlier test left on qcompiler's loggers
        record = _run(other, f"{UNIFORM3},{e2e}")["tune-scales"]
    assert record.stats == {"skipped": "the first output is not token logits (first-output=token-logits)"}
    assert to_text(other, elide_over=None) == to_text(other_rtn, elide_over=None)
    assert "scales left as they are" in caplog.text


@pytest.mark.parametrize(("limit", "learned"), [(16383, False), (16384, True)])
def test_max_weights_leaves_larger_models_as_they_are(limit, learned, caplog):
    """The four 64 x 64 layers hold 16384 weights: over the limit the pass warns and changes nothing."""
    rtn, limited = _model(), _model()
    _run(rtn, UNIFORM3)
    stats = _run(limited, f"{UNIFORM3},tune-scales{{steps=10 regions=1 lr=0.003 max-weights={limit}}}")["tune-scales"].stats
    assert (to_text(rtn, elide_over=None) != to_text(limited, elide_over=None)) is learned
    if not learned:
        assert stats == {"skipped": "16384 weights in mixed layers, over max-weights=16383"}
        assert "over max-weights" in caplog.text


def test_mixed_preset_tunes_scales_end_to_end_by_default():
    from qcompiler.pipeline.spec import TUNE_UP_TO, format_pass

    def tuned(options):
        return [format_pass(p) for p in parse_pipeline(f"mixed{{avg-bits=3{options}}}") if p.name == "tune-scales"]

    (auto,) = tuned("")
    assert "regions=0" in auto and "loss=kl" in auto and f"first-output=token-logits max-weights={TUNE_UP_TO} unsupported=skip" in auto
    assert "compute=auto" in auto  # bfloat16 steps where the CPU multiplies bfloat16 natively
    assert "lr=0.003 " in auto and "schedule=cosine " in auto  # the rate decayed along half a cosine
    assert tuned(" tuning=auto") == [auto]
    assert "steps=120 " in auto  # below 4 bits
    for budget, steps, lr in (("3.99", 120, 0.003), ("4", 40, 0.004), ("4.25", 40, 0.004)):
        (text,) = [format_pass(p) for p in parse_pipeline(f"mixed{{avg-bits={budget}}}") if p.name == "tune-scales"]
        assert f"steps={steps} " in text and f"lr={lr} " in text
    assert tuned(" tuning=none") == []
    assert tuned(" tuning=e2e-kl") == ["tune-scales{steps=120 lr=0.001 seed=0 time-budget=0.0 regions=0 batch=4 loss=kl act-grids=true "
                                       "tile=0 tile-margin=-1 holdout=0 schedule=constant compute=fp32 first-output=any max-weights=0 unsupported=error}"]


def test_held_float_targets_grow_with_the_memory_available(monkeypatch):
    from qcompiler.analysis import reconstruct
    from qcompiler.support import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 16 << 30)
    assert reconstruct.held_target_limit() == 2 << 30
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    assert reconstruct.held_target_limit() == reconstruct.HELD_TARGET_BYTES
    monkeypatch.setattr(reconstruct, "HELD_TARGET_BYTES", 0)
    assert reconstruct.held_target_limit() == 0


def test_held_out_batches_are_every_nth_when_there_are_enough():
    from qcompiler.analysis.reconstruct import held_out_batches

    assert held_out_batches(7, 4) == [3]
    assert held_out_batches(8, 4) == [3, 7]
    assert held_out_batches(3, 4) == [] and held_out_batches(8, 0) == []


def test_holdout_keeps_the_parameters_of_least_held_out_loss():
    """tune-scales{holdout=4}: the 4th of 4 batches is never a step's batch; its loss is measured
    before learning and 8 times during it, and the parameters kept are those at the least of them."""
    stats = _run(_model(), f"{UNIFORM3},tune-scales{{steps=16 regions=1 lr=0.003 batch=64 holdout=4}}")["tune-scales"].stats
    for block in stats["per_block"]:
        held = block["held_out"]
        assert held["batches"] == [3]
        steps = [s for s, _ in held["losses"]]
        assert steps == [0, 2, 4, 6, 8, 10, 12, 14, 16]
        least = min(held["losses"], key=lambda sl: sl[1])
        assert held["best_step"] == least[0]
    same = _model()
    a = _run(same, f"{UNIFORM3},tune-scales{{steps=16 regions=1 lr=0.003 batch=64 holdout=4}}")["tune-scales"].stats
    assert a["per_block"] and [b["held_out"] for b in a["per_block"]] == [b["held_out"] for b in stats["per_block"]]


UNIFORM4 = "calibrate,allocate-bits{avg-bits=8 candidates=4 group-size=32 outliers-act=0 outliers-weight=0},quantize-weights"
# classes of 50 and 14 rows in groups of 32: partial last groups
MIXED_PARTIAL = "calibrate,allocate-bits{avg-bits=5 candidates=2,4,8 group-size=32 outliers-act=0 outliers-weight=0},quantize-weights"


# fractional zero points (learned too), integer ones in whole groups and in partial groups (q - z held once)
@pytest.mark.parametrize("quantized", [UNIFORM3, UNIFORM4, MIXED_PARTIAL])
def test_bf16_steps_learn_what_fp32_steps_learn(quantized):
    """tune-scales{compute=bf16}: the steps' products in bfloat16 (torch's CPU autocast), the losses
    that decide what is kept in float32. On the two-block model it lowers the KL as the float32
    steps do, to within a tenth of their gain, and says which precision it ran in."""
    e2e = "tune-scales{regions=0 loss=kl steps=60 lr=0.003 batch=2 compute=%s}"
    runs, texts = {}, []
    for compute in ("fp32", "bf16", "bf16"):
        model = _model()
        stats = _run(model, f"{quantized},{e2e % compute}")["tune-scales"].stats
        assert stats["compute"] == compute
        runs[compute] = stats["per_block"][0]
        texts.append(to_text(model, elide_over=None))
    assert texts[1] == texts[2]  # the same seed, the same IR
    assert texts[0] != texts[1]  # the bfloat16 steps ran: their rounding moved the learned scales
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert fp32["loss_before"] == bf16["loss_before"]  # measured in float32 either way
    assert bf16["kept"] == "learned"
    gain_fp32, gain_bf16 = fp32["loss_before"] - fp32["loss_after"], bf16["loss_before"] - bf16["loss_after"]
    assert gain_fp32 > 0 and abs(gain_bf16 - gain_fp32) < 0.1 * gain_fp32


def test_compute_auto_is_bf16_where_the_cpu_multiplies_bfloat16(monkeypatch):
    from qcompiler.analysis import reconstruct

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(reconstruct, "native_bf16", lambda native=native: native)
        stats = _run(_model(), f"{UNIFORM4},tune-scales{{steps=2 regions=1 compute=auto}}")["tune-scales"].stats
        assert stats["compute"] == expected
    assert reconstruct.step_compute("fp32") == "fp32" and reconstruct.step_compute("bf16") == "bf16"
    with pytest.raises(UserError, match="compute"):
        parse_pipeline(f"{UNIFORM4},tune-scales{{compute=fp16}}")


def test_a_partial_last_group_is_scaled_as_the_gathered_form():
    """`_Layer._scaled`: whole groups and a partial last group broadcast their scales; the values are
    those of each row times its group's scale (a per-row gather)."""
    import torch

    from qcompiler.analysis.reconstruct import _Layer

    layer = _Layer.__new__(_Layer)
    layer.group_size = 32
    rng = np.random.default_rng(3)
    for rows in (64, 70, 20):
        qz = torch.from_numpy(rng.integers(-8, 8, (rows, 5)).astype(np.float32))
        s = torch.from_numpy(rng.uniform(0.1, 1.0, (-(-rows // 32), 5)).astype(np.float32)).requires_grad_()
        upstream = torch.from_numpy(rng.normal(0, 1, (rows, 5)).astype(np.float32))
        gathered = qz * s[torch.arange(rows) // 32]
        (grad_gathered,) = torch.autograd.grad((gathered * upstream).sum(), s)
        scaled = layer._scaled(qz, s)
        (grad_scaled,) = torch.autograd.grad((scaled * upstream).sum(), s)
        assert torch.equal(scaled, gathered)
        assert torch.allclose(grad_scaled, grad_gathered, rtol=1e-5, atol=1e-6)  # the same sums, in another order
        z = torch.from_numpy(rng.uniform(-2, 2, tuple(s.shape)).astype(np.float32))  # fractional zero points
        assert torch.equal(layer._scaled(qz, s, z), (qz - z[torch.arange(rows) // 32]) * s[torch.arange(rows) // 32])


def test_bf16_steps_after_quantize_keep_the_activation_grids_in_float32():
    """After `quantize`, a bfloat16 step's products reach the int8 activation grids in bfloat16;
    the grids quantize in float32 (dynamic ones through numpy, which has no bfloat16), so every
    block takes its steps."""
    for act_mode in ("static", "dynamic"):
        stats = _run(_model(), f"calibrate,quantize{{act-mode={act_mode}}},tune-scales{{steps=10 regions=1 lr=0.003 compute=bf16}}")["tune-scales"].stats
        assert stats["compute"] == "bf16" and [b["steps"] for b in stats["per_block"]] == [10, 10]


def test_tune_scales_skips_a_model_the_block_interpreter_cannot_run_when_asked(caplog):
    """unsupported=skip (the mixed preset's tuning=auto): the scales stay as quantize-weights wrote them, and
    the warning names the op."""
    before, model = _with_op_the_interpreter_lacks(), _with_op_the_interpreter_lacks()
    pipeline = "calibrate,allocate-bits{avg-bits=5 outliers-act=0 group-size=32},quantize-weights"
    _run(before, pipeline)
    stats = _run(model, f"{pipeline},tune-scales{{steps=5 unsupported=skip}}")["tune-scales"].stats
    assert stats == {"skipped": "the block interpreter cannot run Hardmax"}
    assert "cannot run Hardmax" in caplog.text
    assert to_text(before, elide_over=None) == to_text(model, elide_over=None)
    with pytest.raises(UserError, match="cannot run Hardmax"):
        _run(_with_op_the_interpreter_lacks(), f"{pipeline},tune-scales{{steps=5}}")


def test_cosine_schedule_runs_the_rate_from_lr_down_to_near_zero():
    """`schedule=cosine`: step 0 at lr, half way at lr / 2, the last step near 0, never rising;
    `constant` (the default) keeps lr. The steps take the scheduled rate."""
    from qcompiler.analysis.reconstruct import Options, scheduled_lr

    cosine = Options("scales", 40, 0.002, 0, 0.0, 0, "tune-scales", schedule="cosine")
    rates = [scheduled_lr(cosine, step) for step in range(40)]
    assert rates[0] == 0.002 and rates[20] == pytest.approx(0.001) and rates[-1] < 0.002 * 0.01
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert {scheduled_lr(dataclasses.replace(cosine, schedule="constant"), step) for step in range(40)} == {0.002}
    texts = []
    for schedule in ("constant", "cosine"):
        model = _model()
        _run(model, f"{UNIFORM4},tune-scales{{steps=8 regions=1 lr=0.01 schedule={schedule}}}")
        texts.append(to_text(model, elide_over=None))
    assert texts[0] != texts[1]
    with pytest.raises(UserError, match="schedule"):
        parse_pipeline(f"{UNIFORM4},tune-scales{{schedule=linear}}")
