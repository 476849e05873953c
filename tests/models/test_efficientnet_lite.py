"""EfficientNet-Lite0 (`efficientnet-lite0`): the crops and feeds it is given, its bad input, and
(slow tier) the weights loading exactly, the captured graph matching torch and still matching after
`equalize` through its ReLU6s, and `w8a8` (plain, and with that equalization) compiling and
agreeing with float on most crops."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.errors import UserError
from qcompiler.models import efficientnet_lite as eff
import qcompiler.models as qm

slow = pytest.mark.slow


def test_crops_cover_the_photo_on_a_grid():
    image = np.arange(300 * 400 * 3, dtype=np.int64).reshape(300, 400, 3).astype(np.uint8)
    crops = eff.crops(image, grid=3)
    assert len(crops) == 9 and all(c.shape == (eff.SIZE, eff.SIZE, 3) and c.dtype == np.uint8 for c in crops)
    assert not np.array_equal(crops[0], crops[-1])
    assert eff.crops(image[:, :, 0], grid=1)[0].shape == (eff.SIZE, eff.SIZE, 3)  # grey repeated


def test_feeds_are_normalised_nchw():
    crop = np.full((eff.SIZE, eff.SIZE, 3), 255, np.uint8)
    feeds = eff.to_feeds([crop, np.zeros_like(crop)])
    assert feeds["image"].shape == (2, 3, eff.SIZE, eff.SIZE)
    assert feeds["image"][0].min() == pytest.approx(1.0) and feeds["image"][1].max() == pytest.approx(-127 / 128)


@pytest.mark.parametrize("bad", [np.zeros((eff.SIZE, eff.SIZE, 3), np.float32), np.zeros((100, eff.SIZE, 3), np.uint8)])
def test_bad_crops_are_one_line_user_errors(bad):
    with pytest.raises(UserError, match="efficientnet-lite0"):
        eff.to_feeds([bad])


def test_top1_agreement_counts_matching_argmax():
    reference = np.array([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert eff.top1_agreement(reference, reference[:, ::-1]) == 0.0
    assert eff.top1_agreement(reference, reference * 2) == 1.0


@slow
def test_captured_graph_matches_torch():
    import torch

    from qcompiler.analysis import execute
    from qcompiler.driver.capture import resolve
    from qcompiler.tools.opt import optimize

    bundled = qm.get("efficientnet-lite0")
    feeds = bundled.probe_inputs()
    with torch.no_grad():
        expected = bundled.build()(torch.from_numpy(feeds["image"])).numpy()
    model, _ = resolve("efficientnet-lite0")
    got = execute.run(model, feeds)["logits"]
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    # equalizing through the ReLU6s leaves the float model's outputs as they were
    stats = optimize(model, "canonicalize,equalize{clip=per-channel}")[1].stats
    assert stats["pairs_rescaled"] == 34 and stats["clips_made_per_channel"] == 32
    np.testing.assert_allclose(execute.run(model, feeds)["logits"], got, atol=1e-5 * np.abs(got).max())


@slow
@pytest.mark.parametrize(("pipeline", "agreement", "cosine"), [
    ("w8a8", 0.75, 0.97),  # the ReLU6 outputs quantized after the clip: [0, 6] on the int8 grid
    ("w8a8{equalize=relu6 bias-correction=true}", 0.6, 0.8),
])
def test_w8a8_agrees_with_float(tmp_path, pipeline, agreement, cosine):
    """Compiled on the calibration photos' centre crops, the `classify` eval task agrees with float
    on most of 18 held-out crops (the benchmark, `benchmarks/equalize.py`, measures 72)."""
    import qcompiler
    from qcompiler.tools.evaluate import evaluate

    bundled = qm.get("efficientnet-lite0")
    batches = [eff.to_feeds(bundled.calibration_crops(grid=1))]
    qcompiler.compile("efficientnet-lite0", tmp_path / "int8", pipeline=pipeline, calibration=batches, drift=False, threads=2)
    result = evaluate(tmp_path / "int8", "classify", count=18, threads=2)
    assert result["crops"] == 18 and result["photos"] == ["astronaut", "chelsea"]
    assert result["top1_agreement"] >= agreement and result["logit_cosine_mean"] > cosine, result


def test_classify_task_refuses_another_model(tmp_path):
    from qcompiler.tools.evaluate import _classify

    with pytest.raises(UserError, match="task 'classify' needs a classifier"):
        _classify(qm.get("ffdnet-gray"), None, None, 1, 8)
