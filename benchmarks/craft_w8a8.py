"""CRAFT (VGG16-BN U-Net text detector) compiled to int8: Dice of its region and affinity masks
against the float model's, on scikit-image's bundled photos, and latency against float32.

Calibration uses scikit-image photos that are not among the evaluation images
(`qcompiler.tools.evaluate.SEGMENTATION_IMAGES`). Latency: the float model (`default` pipeline) and
the artifact on the first evaluation image at the model's input size, batch 1, 2 intra-op threads,
`--repeats` interleaved rounds, the median of per-round ratios to float32. Prints a table and writes JSON.

    python benchmarks/craft_w8a8.py [--pipeline w8a8] [--repeats 12] [--json benchmarks/results/craft_w8a8.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import qcompiler
from qcompiler.driver.compiler import package_versions
from qcompiler.tools.evaluate import SEGMENTATION_IMAGES, evaluate, segmentation_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

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
    parser.add_argument("--repeats", type=int, default=12, help="interleaved latency rounds (default 12; 0 skips the timing)")
    parser.add_argument("--json", default="benchmarks/results/craft_w8a8.json")
    args = parser.parse_args()
    common.quiet()
    common.fix_threads(common.THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "calib").mkdir()
        images = calibration_folder(tmp / "calib")
        start = time.perf_counter()
        result = qcompiler.compile("craft", tmp / "craft", pipeline=args.pipeline, calibration=tmp / "calib",
                                   calib_count=len(images), drift=False, threads=2)
        seconds = time.perf_counter() - start
        scores = evaluate(tmp / "craft", "segmentation", threads=2)
        timing = latency(tmp, args.repeats) if args.repeats else None
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
        "git": common.git_state(),
        "command": common.command_line(),
        "latency": timing,
    }
    print(f"{'image':<10} {'region':>8} {'affinity':>9}")
    for name, dice in scores["per_image"].items():
        print(f"{name:<10} {dice['region']:>8.4f} {dice['affinity']:>9.4f}")
    print(f"mean Dice {row['dice_mean']:.4f} (min {row['dice_min']:.4f}; target >= {TARGET_DICE}); compile {row['compile_s']} s")
    if timing:
        print(f"latency: float32 {timing['float32']['median_ms']} ms, int8 {timing['int8']['median_ms']} ms, "
              f"{timing['int8']['paired_ratio']:.2f}x float32 (interquartile {timing['int8']['paired_ratio_p25']:.2f} to "
              f"{timing['int8']['paired_ratio_p75']:.2f}); load average {timing['load_average']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")


def latency(tmp: Path, repeats: int) -> dict:
    """The float model (compiled with `default`) and the artifact in `tmp / "craft"` on one evaluation image,
    interleaved (`common.interleaved_latency`), 2 intra-op threads."""
    from qcompiler.analysis.execute import ort_session
    import qcompiler.models as qm

    qcompiler.compile("craft", tmp / "float32", pipeline="default", drift=False, threads=common.THREADS)
    name, image = segmentation_images(1)[0]
    feeds = qm.get("craft").inputs_from_raw([image])
    sessions = {key: ort_session(str(tmp / folder / "model.onnx"), common.THREADS) for key, folder in (("float32", "float32"), ("int8", "craft"))}
    timing = common.interleaved_latency({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()},
                                        warmup=2, repeats=repeats, reference="float32")
    timing = {k: {kk: vv for kk, vv in v.items() if kk != "samples_ms"} for k, v in timing.items()}
    return {**timing, "image": name, "input_shape": list(feeds["image"].shape), "threads": common.THREADS,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


if __name__ == "__main__":
    main()
