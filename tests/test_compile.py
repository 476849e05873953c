"""End to end through the CLI and the API: capture, pipeline, dumps, artifact, exit codes."""

import json
import sys

import numpy as np
import pytest
import torch

import qcompiler
from qcompiler.analysis import execute
from qcompiler.ir import parse
from qcompiler.tools.cli import main


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x, mask):
        h = self.norm(torch.nn.functional.gelu(self.fc1(x)))
        return self.fc2(h) * mask.unsqueeze(-1)


def build():
    """A factory for `package.module:function` sources."""
    inputs = {"x": torch.randn(2, 5, 8), "mask": torch.ones(2, 5)}
    return TinyNet().eval(), inputs, {"x": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}}


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art")
    module, inputs, dims = build()
    result = qcompiler.compile(module, out / "net", example_inputs=inputs, dynamic_shapes=dims,
                               dump_ir=out / "ir", report=out / "net" / "report.json")
    return result, out


def test_captured_model_matches_torch_on_other_shapes(tiny_artifact):
    result, _ = tiny_artifact
    module, _, _ = build()
    x, mask = torch.randn(3, 7, 8), torch.ones(3, 7)
    mask[0, 5:] = 0
    expected = module(x, mask).detach().numpy()
    session = execute.ort_session(str(result.output / "model.onnx"))
    (actual,) = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_artifact_files_and_manifest(tiny_artifact):
    result, out = tiny_artifact
    assert sorted(p.name for p in result.output.iterdir()) == ["manifest.json", "model.onnx", "report.json"]
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert manifest["pipeline"] == "canonicalize{fold-limit=67108864},lower-ort{act-format=auto mixed-route=split fp16-route=auto codebook-route=load int-kernels=auto residual-norm=apart shared-input=auto rms-norm=auto attention=auto weight-format=auto accuracy-level=auto}"
    assert manifest["opsets"] == {"ai.onnx": 21}
    assert manifest["effective_bits_per_weight"] == 32.0
    assert manifest["weights"] == 8 * 16 + 16 * 4
    report = json.loads((result.output / "report.json").read_text())
    assert report["passes"][0]["name"] == "canonicalize"


def test_dump_has_numbered_parseable_files_and_stats(tiny_artifact):
    _, out = tiny_artifact
    dump = out / "ir"
    assert sorted(p.name for p in dump.iterdir()) == [
        "000-input.onnxtxt", "001-canonicalize.onnxtxt", "002-lower-ort.onnxtxt", "stats.json",
    ]
    parse((dump / "001-canonicalize.onnxtxt").read_text())
    stats = json.loads((dump / "stats.json").read_text())
    assert [r["name"] for r in stats["passes"]] == ["canonicalize", "lower-ort"]
    for record in stats["passes"]:
        assert record["drift"]["max_abs"] < 1e-5
        assert record["drift"]["cosine"] > 0.999999
        assert {"seconds", "modified", "stats"} <= set(record)


def test_compiling_twice_gives_identical_bytes(tiny_onnx, tmp_path):
    for name in ("a", "b"):
        assert main(["-q", "compile", str(tiny_onnx), "-o", str(tmp_path / name)]) == 0
    for file in ("model.onnx", "manifest.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_compiling_an_ir_model_leaves_it_as_given(tmp_path):
    from qcompiler.ir import to_text

    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 4] X) => (float[N, 3] Y)
    <float[4,3] W = {1,2,3,4,5,6,7,8,9,10,11,12}>
    { Y = MatMul (X, W) }""")
    before = to_text(model, elide_over=None)
    calib = [{"X": np.random.default_rng(s).standard_normal((2, 4)).astype(np.float32)} for s in range(2)]
    qcompiler.compile(model, tmp_path / "a", pipeline="w8a8", calibration=calib, drift=False)
    assert to_text(model, elide_over=None) == before
    qcompiler.compile(model, tmp_path / "b", pipeline="w8a8", calibration=calib, drift=False)
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()


def test_factory_source(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    monkeypatch.setitem(sys.modules, "tiny_factory", sys.modules[__name__])
    assert main(["-q", "compile", "tiny_factory:build", "-o", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "model.onnx").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["compile", "{onnx}", "-o", "{out}", "--pipeline", "canonicalise"], "did you mean 'canonicalize'"),
        (["compile", "{missing}", "-o", "{out}"], "not found"),
        (["compile", "minilm-l7", "-o", "{out}"], "did you mean 'minilm-l6'"),
        (["compile", "{onnx}", "-o", "{out}", "--target", "tpu"], "unknown target 'tpu'"),
        (["compile", "no_such_module:build", "-o", "{out}"], "cannot import 'no_such_module:build'"),
        (["compile", "{onnx}"], "compile needs -o DIR"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tiny_onnx, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    argv = [a.format(onnx=tiny_onnx, out=out, missing=tmp_path / "missing.onnx") for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_unwritable_output_exits_2(tiny_onnx, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["compile", str(tiny_onnx), "-o", str(blocker / "sub")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_failing_torch_export_shows_torch_reason(tmp_path):
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be exported
                return x + 1
            return x - 1

    with pytest.raises(qcompiler.UserError, match="torch could not export the model: .*"):
        qcompiler.compile(DataDependent(), tmp_path / "o", example_inputs={"x": torch.randn(2)})
    assert not (tmp_path / "o").exists()


def test_show_and_passes_commands(tiny_onnx, capsys):
    assert main(["show", str(tiny_onnx)]) == 0
    assert "Gemm" in capsys.readouterr().out
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "canonicalize: Gemm to MatMul" in out and "fold-limit=67108864" in out
    assert "  calibrated: weighted layers' inputs carry calibration statistics" in out


def test_existing_output_is_replaced_whole(tiny_onnx, tmp_path):
    out = tmp_path / "o"
    assert main(["-q", "compile", str(tiny_onnx), "-o", str(out)]) == 0
    (out / "stale.txt").write_text("old")  # a previous artifact (our manifest) with a stray file
    assert main(["-q", "compile", str(tiny_onnx), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]


def test_artifact_has_ordinary_permissions(tiny_onnx, tmp_path):
    import os
    import stat

    assert main(["-q", "compile", str(tiny_onnx), "-o", str(tmp_path / "p")]) == 0
    mode = stat.S_IMODE(os.stat(tmp_path / "p").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask


def test_dynamic_dims_of_size_1_are_doubled_for_the_export_only():
    """torch.export may fix a dynamic dimension that is 1 in the example (a Swin Transformer's batch, then
    refused by ONNX Runtime at batch 8): the export sees it repeated to 2; dims not declared dynamic, and
    inputs without a size-1 dynamic dim, are left alone."""
    import torch

    from qcompiler.driver.capture import _widened

    ids, mask = torch.arange(6).reshape(1, 6), torch.ones(1, 6)
    widened = _widened({"input_ids": ids, "attention_mask": mask}, {"input_ids": {0: "batch", 1: "seq"}})
    assert widened["input_ids"].shape == (2, 6) and torch.equal(widened["input_ids"][1], ids[0])
    assert widened["attention_mask"] is mask
    assert _widened({"x": torch.ones(2, 3)}, {"x": {0: "batch"}}) is None
    assert _widened({"x": torch.ones(1, 3)}, None) is None


class _TwoNamedOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x):
        features = self.proj(x)
        return {"features": features, "pooled": features.mean(dim=1)}


def test_outputs_are_named_by_the_keys_the_module_returns_them_under():
    from qcompiler.driver.capture import capture

    torch.manual_seed(0)
    model = capture(_TwoNamedOutputs(), {"x": torch.randn(2, 3, 8)}, {"x": {0: "batch", 1: "seq"}})
    assert [v.name for v in model.graph.outputs] == ["features", "pooled"]
    tupled = capture(torch.nn.Linear(8, 4), [torch.randn(2, 8)])  # a tensor, not a mapping: the exporter's name
    assert len(tupled.graph.outputs) == 1
