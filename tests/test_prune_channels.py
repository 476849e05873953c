"""prune-channels: a model pruned with a binary mask compiles to the same function, smaller."""

import numpy as np
import onnx
import torch

import qcompiler
from qcompiler.analysis import execute
from qcompiler.ir import parse
from qcompiler.pipeline.context import CompileContext, using
from qcompiler.pipeline.pass_manager import run_pipeline
from qcompiler.pipeline.spec import parse_pipeline


class GatedMLP(torch.nn.Module):
    def __init__(self, d=32, h=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.gate, self.up = torch.nn.Linear(d, h), torch.nn.Linear(d, h, bias=False)
        self.down, self.head = torch.nn.Linear(h, d), torch.nn.Linear(d, 8)

    def forward(self, x):
        y = x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))
        return self.head(torch.relu(y))


def _pruned(seed=0):
    """Masks as a sparse-connectivity training leaves them: 20 of the 64 hidden channels dead
    (their rows of `down` all zero) and 30 % scattered zeros in `gate`."""
    module = GatedMLP(seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dead = torch.randperm(64, generator=g)[:20]
        mask = torch.ones(32, 64)
        mask[:, dead] = 0  # torch's Linear stores [out, in]: input channels are columns
        module.down.weight.mul_(mask)
        module.gate.weight.mul_((torch.rand(64, 32, generator=g) > 0.3).float())
    return module


def test_pruned_model_compiles_to_the_float_function(tmp_path):
    module = _pruned()
    x = torch.randn(5, 32)
    path = tmp_path / "pruned.onnx"
    model = qcompiler.capture(module, {"x": x}, {"x": {0: "batch"}})
    onnx.save(qcompiler.ir.to_proto(model), str(path))
    result = qcompiler.compile(str(path), tmp_path / "out", pipeline="prune-channels", drift=False)
    compiled = onnx.load(str(tmp_path / "out" / "model.onnx"))
    shapes = sorted(tuple(t.dims) for t in compiled.graph.initializer if len(t.dims) == 2)
    assert (44, 32) in shapes and (32, 44) in shapes  # down [in=44 -> 32], gate/up [32 -> 44] as MatMul weights
    session = execute.ort_session(compiled)
    got = session.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, module(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    stats = {r.name: r.stats for r in result.records}
    assert stats["prune-channels"]["channels_removed"] == 20
    assert 0.05 < stats["prune-channels"]["sparsity"]["zero_fraction"] < 0.5


def test_channel_read_elsewhere_stays_and_sparsity_is_reported():
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 1, (8, 6)).astype(np.float32)
    w2 = rng.normal(0, 1, (6, 4)).astype(np.float32)
    w2[[1, 4]] = 0
    w1[0, 0] = 0

    def text(extra_output):
        outs = "(float[M, 4] Y, float[M, 6] H)" if extra_output else "(float[M, 4] Y)"
        vals = lambda a: ",".join(f"{v:.6f}" for v in a.ravel())  # noqa: E731
        return f"""<ir_version: 10, opset_import: ["" : 21]>
        g (float[M, 8] X) => {outs}
        <float[8,6] W1 = {{{vals(w1)}}}, float[6,4] W2 = {{{vals(w2)}}}>
        {{ A = MatMul (X, W1)
           H = Relu (A)
           Y = MatMul (H, W2) }}"""

    feeds = {"X": rng.normal(0, 1, (3, 8)).astype(np.float32)}
    for extra, removed in ((False, 2), (True, 0)):
        model = parse(text(extra))
        expected = execute.run(parse(text(extra)), feeds)
        with using(CompileContext()):
            (record,) = run_pipeline(model, parse_pipeline("prune-channels"))[-1:]
        assert record.stats["channels_removed"] == removed
        assert record.stats["sparsity"]["per_layer"]
        for name, value in execute.run(model, feeds).items():
            np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-6)
