"""CRAFT (VGG16-BN U-Net text detector) compiled to int8: Dice of its region and affinity masks
against the float model's, on scikit-image's bundled photos.

Calibration uses scikit-image photos that are not among the evaluation images
(`qcompiler.tools.evaluate.SEGMENTATION_IMAGES`). Prints a table and writes JSON.

    python benchmarks/craft_w8a8.py [--pipeline w8a8] [--json benchmarks/results/craft_w8a8.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import qcompiler
from qcompiler.driver.compiler import package_versions
from qcompiler.tools.evaluate import SEGMENTATION_IMAGES, evaluate

TARGET_DICE = 0.97


def calibration_folder(into: Path) -> list[str]:
    """Copy the bundled scikit-image photos that are not evaluation images into `into`."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    used = []
    for path in sorted(data.iterdir()):
        if path.suffix in (".png", ".jpg") and path.stem not in SEGMENTATION_IMAGES:
            shutil.copy(path, into / path.name)
            used.append(path.name)
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="w8a8")
    parser.add_argument("--json", default="benchmarks/results/craft_w8a8.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "calib").mkdir()
        images = calibration_folder(tmp / "calib")
        start = time.perf_counter()
        result = qcompiler.compile("craft", tmp / "craft", pipeline=args.pipeline, calibration=tmp / "calib",
                                   calib_count=len(images), drift=False, threads=2)
        seconds = time.perf_counter() - start
        scores = evaluate(tmp / "craft", "segmentation", threads=2)
    row = {
        "pipeline": result.pipeline,
        "calibration_images": images,
        "compile_s": round(seconds, 1),
        "dice_mean": scores["dice_mean"],
        "dice_min": scores["dice_min"],
        "per_image": scores["per_image"],
        "target_dice": TARGET_DICE,
        "passes_target": scores["dice_mean"] >= TARGET_DICE,
        "packages": package_versions(),
    }
    print(f"{'image':<10} {'region':>8} {'affinity':>9}")
    for name, dice in scores["per_image"].items():
        print(f"{name:<10} {dice['region']:>8.4f} {dice['affinity']:>9.4f}")
    print(f"mean Dice {row['dice_mean']:.4f} (min {row['dice_min']:.4f}; target >= {TARGET_DICE}); compile {row['compile_s']} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
