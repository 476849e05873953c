"""`qcompiler eval`: the float model and a compiled artifact side by side on a bundled model's task.

- `sts` (sentence embeddings): cosine similarity of the embeddings of each sentence pair, Spearman
  rank correlation (x100) with the human scores; plus the mean cosine between float and compiled
  embeddings of the same sentence.
- `perplexity` (causal LM): exp of the mean next-token cross-entropy over non-overlapping windows
  of `window` tokens of the text (the first `count` windows; both stated in the result). An
  artifact with a KV cache runs each window through its cache (a prefill of the first half, then
  one token per step); its float model runs the whole window at once.
- `segmentation` (CRAFT): Dice of the compiled model's region and affinity masks (score >
  `MASK_THRESHOLD`) against the float model's, on scikit-image's bundled photos.
- `denoise` (FFDNet): each clean photo plus seeded Gaussian noise at `sigma` (0..255 scale), run
  through the float model and the artifact; PSNR (dB) and SSIM of the noisy input, the float
  output and the artifact's output against the clean photo (outputs clipped to [0, 1]). The
  photos are the model's evaluation photos (never used for calibration), or `data`: an image file
  or a folder of them.
- `segmentation3d` (deepbet): each T1 volume through the float model and the artifact; Dice of
  the artifact's brain mask against the float model's, and of both against a reference mask where
  one is known (nilearn's MNI152 brain mask for the model's evaluation volumes). The volumes are
  the model's evaluation volumes (never used for calibration), or `data`: a NIfTI file
  (`.nii`, `.nii.gz`) or a `.npy` array of one 3D volume.

The float model is the bundled torch module (float32) named in the artifact's manifest.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qcompiler.errors import UserError
from qcompiler.support.progress import progress

log = logging.getLogger(__name__)

TASKS = ("sts", "perplexity", "segmentation", "denoise", "classify", "segmentation3d")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy")
DEFAULT_SIGMA = 25.0
MASK_THRESHOLD = 0.5
SEGMENTATION_IMAGES = ("page", "text", "coins", "camera", "astronaut", "coffee")

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


def evaluate(
    artifact: str | Path,
    task: str,
    data: str | Path | None = None,
    *,
    count: int | None = None,
    window: int = 256,
    batch_size: int = 16,
    threads: int | None = None,
    model: str | None = None,
    sigma: float | None = None,
) -> dict:
    """Score the float model and the artifact on `task`; returns a JSON-able dict. `model` names
    the bundled float model when the artifact was compiled from an ONNX file of it; `sigma` is the
    noise level of `denoise` (default 25)."""
    if task not in TASKS:
        raise UserError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    if sigma is not None and task != "denoise":
        raise UserError(f"--sigma applies to --task denoise only, not '{task}'; drop it")
    images = targets = None
    if task == "denoise":
        from qcompiler.models.ffdnet import check_sigma

        sigma = check_sigma(DEFAULT_SIGMA if sigma is None else sigma)
        images = denoise_images(data)  # bad data fails before any model is built
    volumes = read_volume(data) if task == "segmentation3d" and data is not None else None
    artifact = Path(artifact)
    if not (artifact / "model.onnx").is_file():
        raise UserError(f"'{artifact}' is not a compiled artifact (no model.onnx); give the -o directory of `qcompiler compile`")
    bundled = _bundled_from_manifest(artifact, model)
    if task == "denoise":
        targets = denoise_targets(bundled, images, count)  # a wrong image fails before any model is built
    if task == "segmentation3d" and getattr(bundled, "task", None) != "segmentation3d":
        raise UserError(f"task 'segmentation3d' needs a 3D segmentation model; '{bundled.name}' is evaluated with --task {bundled.task}")
    if getattr(bundled, "layout", None) is not None:  # a causal LM with a KV cache
        if task != "perplexity":
            raise UserError(f"'{artifact}' holds a causal LM; its task is perplexity")
        compiled = _cached_runner(artifact, threads)
        reference = lambda feeds: bundled.full_logits(feeds["input_ids"])  # noqa: E731 (the full sequence, no cache)
    else:
        compiled = _ort_runner(artifact / "model.onnx", threads)
        reference = _torch_runner(bundled)
    start = time.perf_counter()
    if task == "sts":
        result = _sts(bundled, reference, compiled, _need(data, task), count, batch_size)
    elif task == "perplexity":
        result = _perplexity(reference, compiled, _need(data, task), count, window)
    elif task == "denoise":
        result = _denoise(reference, compiled, targets, sigma)
    elif task == "classify":
        result = _classify(bundled, reference, compiled, count, batch_size)
    elif task == "segmentation3d":
        result = _segmentation3d(bundled, reference, compiled, volumes, count)
    else:
        result = _segmentation(bundled, reference, compiled, count)
    result.update(task=task, model=bundled.name, artifact=str(artifact), seconds=round(time.perf_counter() - start, 2))
    return result


def _need(data, task: str) -> Path:
    if data is None:
        raise UserError(f"task '{task}' needs --data FILE")
    path = Path(data)
    if not path.is_file():
        raise UserError(f"data file '{path}' not found")
    return path


def _bundled_from_manifest(artifact: Path, name: str | None = None):
    from qcompiler import models

    if name is not None:
        return models.get(name)
    manifest_path = artifact / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"'{artifact}' is not a compiled artifact (no manifest.json); give the -o directory of `qcompiler compile`")
    source = json.loads(manifest_path.read_text()).get("source", {})
    if source.get("kind") != "bundled":
        raise UserError(f"eval compares against a bundled model's float version; '{artifact}' was compiled from {source.get('kind')} '{source.get('name')}': name the bundled model with --model")
    return models.get(source["name"])


def _ort_runner(path: Path, threads: int | None) -> Runner:
    from qcompiler.analysis.execute import ort_session

    session = ort_session(str(path), threads)
    return lambda feeds: session.run(None, feeds)[0]


def _cached_runner(artifact: Path, threads: int | None) -> Runner:
    """Logits of one window through the artifact's KV cache: a prefill of its first half, then
    one token per step (what generation runs)."""
    from qcompiler.codegen.lm_artifact import read_layout
    from qcompiler.tools.decode import CachedSession, cached_logits

    session = CachedSession(artifact / "model.onnx", read_layout(artifact), threads)

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.stack([cached_logits(session, row, max(1, len(row) // 2)) for row in feeds["input_ids"]])

    return run


def _torch_runner(bundled) -> Runner:
    import torch

    module = bundled.build()

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            out = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return (out[0] if isinstance(out, tuple) else out).numpy()

    return run


# --------------------------------------------------------------------------------------------
# STS


def read_sts(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or not {"sent1", "sent2", "score"} <= set(rows[0]):
        raise UserError(f"'{path}' is not an STS file: it needs a header with sent1, sent2 and score columns")
    return [r["sent1"] for r in rows], [r["sent2"] for r in rows], np.array([float(r["score"]) for r in rows])


def _sts(bundled, reference: Runner, compiled: Runner, path: Path, count, batch_size) -> dict:
    first, second, scores = read_sts(path)
    if count:
        first, second, scores = first[:count], second[:count], scores[:count]
    sentences = first + second
    order = np.argsort([len(s) for s in sentences], kind="stable")  # similar lengths batch with little padding
    emb = {"float": [], "compiled": []}
    with progress("sts batches", -(-len(sentences) // batch_size)) as bar:
        for i in range(0, len(sentences), batch_size):
            feeds = bundled.inputs_from_raw([sentences[j] for j in order[i : i + batch_size]])
            emb["float"].append(reference(feeds))
            emb["compiled"].append(compiled(feeds))
            bar.update()
    result = {"pairs": len(scores)}
    for key, chunks in emb.items():
        e = emb[key] = unit_rows_in_order(chunks, order)
        n = len(scores)
        result[f"spearman_{key}"] = round(100 * spearman(np.sum(e[:n] * e[n:], axis=1), scores), 3)
    result["spearman_drop"] = round(result["spearman_float"] - result["spearman_compiled"], 3)
    result["mean_cosine_float_vs_compiled"] = round(float(np.mean(np.sum(emb["float"] * emb["compiled"], axis=1))), 6)
    return result


def unit_rows_in_order(chunks: list[np.ndarray], order: np.ndarray) -> np.ndarray:
    """Embedding batches computed in `order` (sentences sorted by length), back in sentence order,
    each row scaled to unit length."""
    e = np.empty((len(order), chunks[0].shape[1]), np.float64)
    e[order] = np.concatenate(chunks)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return e


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    return float(np.dot(ra, rb) / np.sqrt(np.dot(ra, ra) * np.dot(rb, rb)))


# --------------------------------------------------------------------------------------------
# Perplexity


def _perplexity(reference: Runner, compiled: Runner, path: Path, count, window) -> dict:
    from qcompiler.models import smollm2

    windows = smollm2.windows(path.read_text(encoding="utf-8"), window)
    if count:
        windows = windows[:count]
    nll = {"float": 0.0, "compiled": 0.0}
    tokens = 0
    with progress("perplexity windows", len(windows)) as bar:
        for row in windows:
            feeds = {"input_ids": row[None]}
            for key, run in (("float", reference), ("compiled", compiled)):
                nll[key] += next_token_nll(run(feeds)[0], row)
            tokens += len(row) - 1
            bar.update()
    result = {"windows": int(len(windows)), "window_tokens": int(window), "predicted_tokens": tokens}
    for key in nll:
        result[f"perplexity_{key}"] = round(float(np.exp(nll[key] / tokens)), 4)
    result["perplexity_ratio"] = round(result["perplexity_compiled"] / result["perplexity_float"], 5)
    return result


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Sum of -log p(ids[t+1] | ids[..t]) over the window; logits [seq, vocab]."""
    logits = logits[:-1].astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].sum())


# --------------------------------------------------------------------------------------------
# Segmentation


def segmentation_images(count: int | None = None) -> list[tuple[str, np.ndarray]]:
    from skimage import data

    names = SEGMENTATION_IMAGES[:count] if count else SEGMENTATION_IMAGES
    return [(name, getattr(data, name)()) for name in names]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def _segmentation(bundled, reference: Runner, compiled: Runner, count) -> dict:
    per_image = {}
    for name, image in segmentation_images(count):
        feeds = bundled.inputs_from_raw([image])
        expected, actual = reference(feeds)[0], compiled(feeds)[0]
        per_image[name] = {
            channel: round(dice(expected[i] > MASK_THRESHOLD, actual[i] > MASK_THRESHOLD), 5)
            for i, channel in enumerate(("region", "affinity"))
        }
    all_dice = [v for scores in per_image.values() for v in scores.values()]
    return {"images": list(per_image), "threshold": MASK_THRESHOLD, "dice_mean": round(float(np.mean(all_dice)), 5),
            "dice_min": round(float(np.min(all_dice)), 5), "per_image": per_image}


# --------------------------------------------------------------------------------------------
# Denoising


def denoise_images(data) -> list[tuple[str, np.ndarray]] | None:
    """(name, uint8 image) from an image file or a folder of images (name order); None: the
    model's own evaluation photos (chosen once the model is known)."""
    if data is None:
        return None
    from qcompiler.analysis.calib_data import IMAGE_SUFFIXES, read_image

    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"folder '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)}); give images to denoise")
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        files = [path]
    elif path.is_file():
        raise UserError(f"'{path}' is not an image ({', '.join(IMAGE_SUFFIXES)}); give an image or a folder of them")
    else:
        raise UserError(f"data '{path}' not found; give an image or a folder of them")
    return [(p.name, read_image(p)) for p in files]


def denoise_targets(bundled, images, count: int | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, clean image as float HxWxC in [0, 1], the image as read) for a denoising model:
    the first `count` of `images`, or of the model's evaluation photos when None; a wrong channel
    count is a UserError."""
    if getattr(bundled, "task", None) != "denoise":
        raise UserError(f"task 'denoise' needs a denoising model; '{bundled.name}' is evaluated with --task {bundled.task}")
    from qcompiler.models import ffdnet

    if images is None:
        images = bundled.evaluation_images()
    images = images[:count] if count else images
    return [(name, ffdnet.as_channels(image, bundled.channels, bundled.name), image) for name, image in images]


def _denoise(reference: Runner, compiled: Runner, targets, sigma: float) -> dict:
    from qcompiler.models import ffdnet

    per_image = {}
    with progress("denoise images", len(targets)) as bar:
        for name, target, raw in targets:
            noisy = ffdnet.add_noise(target, sigma, ffdnet.image_seed(raw))
            feeds = ffdnet.to_feeds([noisy], [sigma])
            outputs = {"noisy": noisy, "float": _hwc(reference(feeds)), "compiled": _hwc(compiled(feeds))}
            per_image[name] = {f"{metric}_{key}": round(score(target, out), 4)
                               for key, out in outputs.items() for metric, score in (("psnr", ffdnet.psnr), ("ssim", ffdnet.ssim))}
            bar.update()
    result = {"images": list(per_image), "sigma": sigma}
    for key in ("noisy", "float", "compiled"):
        for metric in ("psnr", "ssim"):
            result[f"{metric}_{key}"] = round(float(np.mean([v[f"{metric}_{key}"] for v in per_image.values()])), 4)
    result["psnr_drop"] = round(result["psnr_float"] - result["psnr_compiled"], 4)
    result["psnr_drop_max"] = round(max(v["psnr_float"] - v["psnr_compiled"] for v in per_image.values()), 4)
    result["per_image"] = per_image
    return result


def _hwc(batch: np.ndarray) -> np.ndarray:
    """The first image of an NCHW batch, as HxWxC."""
    return np.transpose(np.asarray(batch)[0], (1, 2, 0))


# --------------------------------------------------------------------------------------------
# 3D segmentation


def read_volume(data) -> list[tuple[str, np.ndarray]]:
    """[(name, volume)] from a NIfTI file (reoriented to RAS, as the model expects) or a `.npy` array."""
    path = Path(data)
    if not path.is_file():
        raise UserError(f"data '{path}' not found; give a NIfTI file (.nii, .nii.gz) or a .npy volume")
    name = path.name.lower()
    if not name.endswith(VOLUME_SUFFIXES):
        raise UserError(f"'{path}' is not a volume ({', '.join(VOLUME_SUFFIXES)}); give a NIfTI file or a .npy array")
    try:
        if name.endswith(".npy"):
            volume = np.load(path, allow_pickle=False)
        else:
            from qcompiler.models.base import optional_import

            nib = optional_import("nibabel", "deepbet-brain")
            volume = np.asarray(nib.as_closest_canonical(nib.load(str(path))).get_fdata(dtype=np.float32))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot read volume '{path}' ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "give a NIfTI file or a .npy array") from None
    from qcompiler.models.deepbet import as_volume

    return [(path.name, as_volume(volume, "deepbet-brain"))]


def _segmentation3d(bundled, reference: Runner, compiled: Runner, volumes, count) -> dict:
    """Dice of the artifact's brain masks against the float model's and against the reference mask."""
    from qcompiler.models import deepbet

    known = volumes is None
    volumes = bundled.evaluation_volumes() if known else volumes
    volumes = volumes[:count] if count else volumes
    truth = deepbet.reference_mask() if known else None
    per_volume = {}
    with progress("segmentation3d volumes", len(volumes)) as bar:
        for name, volume in volumes:
            feeds = bundled.inputs_from_raw([volume])
            expected, actual = deepbet.brain_mask(reference(feeds))[0], deepbet.brain_mask(compiled(feeds))[0]
            scores = {"dice_vs_float": round(dice(actual, expected), 5),
                      "voxels_float": int(expected.sum()), "voxels_compiled": int(actual.sum())}
            if truth is not None:
                scores.update(dice_float_vs_reference=round(dice(expected, truth), 5),
                              dice_compiled_vs_reference=round(dice(actual, truth), 5))
            per_volume[name] = scores
            bar.update()
    result = {"volumes": list(per_volume), "size": deepbet.SIZE,
              "reference_mask": "nilearn MNI152 brain mask" if truth is not None else None}
    for key in ("dice_vs_float", "dice_float_vs_reference", "dice_compiled_vs_reference"):
        values = [v[key] for v in per_volume.values() if key in v]
        if values:
            result[f"{key}_mean"] = round(float(np.mean(values)), 5)
            result[f"{key}_min"] = round(float(np.min(values)), 5)
    result["per_volume"] = per_volume
    return result


# --------------------------------------------------------------------------------------------
# Classification


def _classify(bundled, reference: Runner, compiled: Runner, count, batch_size) -> dict:
    """Top-1 agreement of the artifact with the float model on 3 x 3 crops of the classifier's
    evaluation photos (the first `count` crops when given); there are no labels."""
    if getattr(bundled, "task", None) != "classify":
        raise UserError(f"task 'classify' needs a classifier; '{bundled.name}' is evaluated with --task {bundled.task}")
    from qcompiler.models import efficientnet_lite

    crops = bundled.evaluation_crops()
    crops = crops[:count] if count else crops
    expected, got = [], []
    with progress("classify crops", len(crops)) as bar:
        for start in range(0, len(crops), batch_size):
            feeds = efficientnet_lite.to_feeds([crop for _, crop in crops[start:start + batch_size]])
            expected.append(reference(feeds))
            got.append(compiled(feeds))
            bar.update(min(start + batch_size, len(crops)))
    expected, got = np.concatenate(expected), np.concatenate(got)
    cosine = np.sum(expected * got, axis=1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1))
    return {"photos": sorted({name for name, _ in crops}), "crops": len(crops),
            "top1_agreement": round(efficientnet_lite.top1_agreement(expected, got), 4),
            "logit_cosine_mean": round(float(np.mean(cosine)), 5)}
