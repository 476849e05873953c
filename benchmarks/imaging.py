"""Imaging networks in int8: the FFDNet grey and RGB denoisers (PSNR/SSIM against the clean photo)
and deepbet's 3D brain-extraction net (Dice of brain masks), with latency, ours against ONNX
Runtime's own static quantizer on the same calibration data.

    python benchmarks/imaging.py                              # all three models (about 15 min on 2 cores)
    python benchmarks/imaging.py --models ffdnet-gray --sigmas 25 --count 2 --crop 256   # a quick run
    python benchmarks/imaging.py --models deepbet-brain --json benchmarks/results/imaging_deepbet.json
    python benchmarks/imaging.py --peers-python .venv-peers/bin/python       # with the nncf row

Rows, per model:
- `float32`: our `default` pipeline (the float ONNX Runtime model).
- `ours w8a8`: our `w8a8` preset (per-channel int8 Conv weights, static per-tensor uint8
  activations, Conv activations clipped by MSE, Conv biases corrected).
- `ours w8a8 minmax`: `w8a8{conv-method=calibrated}`, the same with min-max activation ranges.
- `ours mixed 4` (FFDNet): `mixed{avg-bits=4}`, weight-only: every Conv kernel allocated 2, 4 or 8
  bits per im2col row within 4 stored bits per weight, biases corrected, expanded to float32 when the
  session starts (float activations and compute); `mixed 4 sens.` the same with
  `scope=model sensitivity=output`. Their stored bits per weight are in the JSON (`effective_bits`).
- `ort static`: `onnxruntime.quantization.quantize_static` on the float32 model after
  `quant_pre_process` (its symbolic shape inference fails on the free height and width, so it
  runs with `skip_symbolic_shape=True`): QDQ, `per_channel=True`, activations QUInt8, weights
  QInt8, MinMax, ORT's default operator set; a CalibrationDataReader over the very batches ours
  calibrates on.
- `nncf`: NNCF's `quantize` on the float32 ONNX model with its defaults (`benchmarks/nncf_ptq.py`,
  run in the interpreter given by `--peers-python`, the one `benchmarks/peers.py` uses; the row is
  left out without it), on the very batches ours calibrates on. Its artifact is run with ONNX
  Runtime's `QDQPropagationTransformer` disabled: ONNX Runtime 1.23 otherwise refuses it (the
  transformer moves NNCF's int8 QuantizeLinear of the image across a Reshape and gives the copy
  a uint8 zero point).
- `ours w8a8, float act.` (diagnostic): our artifact with its activation QuantizeLinear /
  DequantizeLinear pairs removed, i.e. int8 weights with float activations: what the weights alone
  cost.
Diagnostics per quantized variant and photo (JSON): `offset_max`, the largest constant offset of
the output from float32's per colour channel and 2 x 2 pixel phase (the last convolution's output
channels, shuffled), and `psnr_offset_removed`, the PSNR once those offsets are subtracted (an
oracle measured on the photo itself, not a method): how much of the loss is such offsets.

Data (calibration never overlaps evaluation; `qcompiler.models.ffdnet`): calibration = centre
crops (at most 256 x 256) of the calibration photos (`CALIBRATION_PHOTOS`; the grey model sees RGB
photos as their luminance, the RGB model uses only RGB photos), each at sigma 15, 25 and 50 with
seeded Gaussian noise, in batches of 4 photos (12 samples). Evaluation = the evaluation photos
(`EVALUATION_PHOTOS`: camera, coins, moon, astronaut, chelsea, coffee for grey; astronaut, chelsea,
coffee for RGB), whole (or centre `--crop` squares), seeded Gaussian noise at each sigma (not
clipped), outputs clipped to [0, 1]; PSNR in dB and SSIM (scikit-image, 7x7 window) against the
clean photo, averaged over the photos.

Latency: one 512 x 512 noisy image (centre crop of camera / astronaut, sigma 25), batch 1,
ONNX Runtime CPU sessions with 2 intra-op threads; the variants are timed interleaved
(`common.interleaved_latency`: warm-up, then rounds that run every variant once in a rotated
order); the ratio is the median over rounds of variant / float32 in the same round.

deepbet-brain (`qcompiler.models.deepbet`): the same variants but the diagnostic one. Calibration =
the model's calibration volumes (a T1 contrast made from nilearn's grey/white-matter maps, the
2 mm template, two off-centre boxes of the 1 mm template, the template under a gamma), one batch
each; evaluation = its evaluation volumes (the 1 mm MNI152 template over its whole field of view,
and the same with seeded noise), each prepared as deepbet does at 128^3. Dice of each variant's
brain mask (logit of brain above background) against float32's and against nilearn's MNI152
brain mask at the same resampling. Latency: the template volume, batch 1, 2 threads, interleaved
as above; the load average of the machine is recorded before and after the timing.

Output: the tables on stdout and `benchmarks/results/imaging.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

log = common.log

MODELS = ("ffdnet-gray", "ffdnet-rgb", "deepbet-brain")
VOLUME_MODELS = ("deepbet-brain",)
SIGMAS = (15.0, 25.0, 50.0)
LATENCY_SIZE = 512
LATENCY_PHOTO = {1: "camera", 3: "astronaut"}
CALIBRATION_BATCH = 4
# The targets for int8 FFDNet (checked, not tuned for).
TARGET_DROP_DB = 0.1
TARGET_LATENCY_RATIO = 0.7
TARGET_DICE = 0.99
MIXED_VARIANTS = {"ours mixed 4": "mixed{avg-bits=4}", "ours mixed 4 sens.": "mixed{avg-bits=4 scope=model sensitivity=output}"}


class ListReader:
    """onnxruntime.quantization.CalibrationDataReader over a list of feed dicts."""

    def __init__(self, batches):
        self.batches, self.i = list(batches), 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self):
        self.i = 0


class InFolder:
    """Run with `folder` as the working directory (ORT's pre-processing writes temporaries there)."""

    def __init__(self, folder: Path):
        self.folder, self.previous = folder, None

    def __enter__(self):
        self.previous = os.getcwd()
        os.chdir(self.folder)

    def __exit__(self, *exc):
        os.chdir(self.previous)


def calibration_batches(bundled) -> tuple[list[dict[str, np.ndarray]], str]:
    from qcompiler.models import ffdnet

    names = ffdnet.photo_names(ffdnet.CALIBRATION_PHOTOS, bundled.channels)
    images = bundled.calibration_images()
    batches = [bundled.inputs_from_raw(images[i:i + CALIBRATION_BATCH]) for i in range(0, len(images), CALIBRATION_BATCH)]
    samples = sum(b["image"].shape[0] for b in batches)
    return batches, (f"{len(names)} photos ({', '.join(names)}), centre crops of at most {bundled.crop}x{bundled.crop}, "
                     f"sigma {'/'.join(f'{s:g}' for s in bundled.sigmas)}: {samples} samples in {len(batches)} batches")


def compile_ours(name: str, out: Path, pipeline: str, batches, keep_stats: bool = False) -> dict[str, Any]:
    """Compile a bundled model; with `keep_stats`, also what quantize left in float and what
    lower-ort counts as integer kernels."""
    import qcompiler

    start = time.perf_counter()
    result = qcompiler.compile(name, out, pipeline=pipeline, calibration=batches, drift=False, threads=common.THREADS)
    found = {"model": out / "model.onnx", "pipeline": result.pipeline, "compile_s": round(time.perf_counter() - start, 1),
             "capture_s": result.timings["capture_s"],
             "effective_bits": json.loads((out / "manifest.json").read_text()).get("effective_bits_per_weight")}
    if keep_stats:
        stats = {r.name: r.stats for r in result.records}
        found["quantized_layers"] = stats.get("quantize", {}).get("layers")
        found["float_placement"] = stats.get("quantize", {}).get("float_placement")
        found["kernels"] = stats.get("lower-ort", {}).get("kernels")
    return found


def compile_ort_static(float_model: Path, work: Path, batches) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    pre, out = work / "ort-pre.onnx", work / "ort-static.onnx"
    start = time.perf_counter()
    attempts = []
    with InFolder(work):
        for options in ({}, {"skip_symbolic_shape": True}):
            try:
                quant_pre_process(str(float_model), str(pre), **options)
                attempts.append({"options": options, "ok": True})
                break
            except Exception as exc:  # noqa: BLE001 (ORT raises bare Exception here)
                attempts.append({"options": options, "ok": False, "error": str(exc).splitlines()[0][:200]})
        source = pre if attempts[-1]["ok"] else float_model
        settings = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        quantize_static(str(source), str(out), ListReader(batches), **settings)
    return {"model": out, "pre_process": attempts, "settings": {k: str(v) for k, v in settings.items()},
            "compile_s": round(time.perf_counter() - start, 1)}


def compile_nncf(float_model: Path, work: Path, batches, python: str) -> dict[str, Any]:
    """NNCF's `quantize` in the peers interpreter (`benchmarks/nncf_ptq.py`), on `batches`."""
    data, out = work / "nncf-calibration.npz", work / "nncf.onnx"
    np.savez(data, **{f"{i}/{name}": array for i, batch in enumerate(batches) for name, array in batch.items()})
    script = Path(__file__).resolve().parent / "nncf_ptq.py"
    done = subprocess.run([python, str(script), str(float_model), str(data), str(out)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"nncf_ptq.py failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return {"model": out, **json.loads(done.stdout.strip().splitlines()[-1])}


def nncf_session(path: Path):
    """A session of NNCF's artifact (ONNX Runtime 1.23 refuses it unless QDQ propagation is off)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads, options.inter_op_num_threads = common.THREADS, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["QDQPropagationTransformer"])


def without_activation_quantization(model_path: Path, out: Path) -> dict[str, Any]:
    """A copy of a QDQ model whose activation QuantizeLinear -> DequantizeLinear pairs are removed
    (readers of the DequantizeLinear read the float tensor); weights stay int8."""
    import onnx

    proto = onnx.load(str(model_path))
    nodes = list(proto.graph.node)
    quantized = {n.output[0]: n.input[0] for n in nodes if n.op_type == "QuantizeLinear"}
    restored = {n.output[0]: quantized[n.input[0]] for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in quantized}
    keep = [n for n in nodes if not (n.op_type == "QuantizeLinear" or (n.op_type == "DequantizeLinear" and n.output[0] in restored))]
    for node in keep:
        for i, name in enumerate(node.input):
            node.input[i] = restored.get(name, name)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    onnx.save(proto, str(out))
    return {"model": out, "removed_pairs": len(restored)}


def phase_offsets(output: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The mean of output - reference per colour channel and 2 x 2 pixel phase: [2, 2, C]."""
    diff = output.astype(np.float64) - reference
    return np.array([[diff[i::2, j::2].mean(axis=(0, 1)) for j in range(2)] for i in range(2)])


def without_offsets(output: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    corrected = output.astype(np.float64).copy()
    for i in range(2):
        for j in range(2):
            corrected[i::2, j::2] -= offsets[i, j]
    return corrected


def evaluation_targets(bundled, count: int | None, crop: int | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from qcompiler.models import ffdnet
    from qcompiler.tools.evaluate import denoise_targets

    targets = denoise_targets(bundled, None, count)
    if crop:
        targets = [(name, ffdnet.centre_crop(clean, crop, crop), raw) for name, clean, raw in targets]
    return targets


def quality(sessions: dict[str, Any], targets, sigmas) -> dict[str, dict]:
    """Per variant, per sigma: mean PSNR/SSIM over the photos and each photo's."""
    from qcompiler.models import ffdnet

    out: dict[str, dict] = {key: {} for key in ["noisy", *sessions]}
    for sigma in sigmas:
        per: dict[str, dict] = {key: {} for key in out}
        for name, clean, raw in targets:
            noisy = ffdnet.add_noise(clean, sigma, ffdnet.image_seed(raw))
            feeds = ffdnet.to_feeds([noisy], [sigma])
            outputs = {"noisy": noisy}
            for key, session in sessions.items():
                outputs[key] = np.transpose(session.run(None, feeds)[0][0], (1, 2, 0))
            for key, image in outputs.items():
                per[key][name] = {"psnr": round(ffdnet.psnr(clean, image), 4), "ssim": round(ffdnet.ssim(clean, image), 4)}
                if key not in ("noisy", "float32"):
                    offsets = phase_offsets(image, outputs["float32"])
                    per[key][name].update(offset_max=round(float(np.abs(offsets).max()), 5),
                                          psnr_offset_removed=round(ffdnet.psnr(clean, without_offsets(image, offsets)), 4))
        for key, scores in per.items():
            out[key][f"{sigma:g}"] = {
                "psnr": round(float(np.mean([s["psnr"] for s in scores.values()])), 3),
                "ssim": round(float(np.mean([s["ssim"] for s in scores.values()])), 4),
                "per_image": scores,
            }
        log(f"  sigma {sigma:g}: " + ", ".join(f"{k} {v[f'{sigma:g}']['psnr']:.2f} dB" for k, v in out.items()))
    return out


def latency(sessions: dict[str, Any], bundled, repeats: int) -> dict[str, dict]:
    from qcompiler.models import ffdnet

    clean = ffdnet.as_channels(ffdnet.photo(LATENCY_PHOTO[bundled.channels], bundled.channels), bundled.channels, bundled.name)
    clean = ffdnet.centre_crop(clean, LATENCY_SIZE, LATENCY_SIZE)
    assert clean.shape[:2] == (LATENCY_SIZE, LATENCY_SIZE)
    feeds = ffdnet.to_feeds([ffdnet.add_noise(clean, 25.0, 0)], [25.0])
    runners = {key: (lambda s=session: s.run(None, feeds)) for key, session in sessions.items()}
    return common.interleaved_latency(runners, warmup=2, repeats=repeats, reference="float32")


def bench_model(name: str, args, work: Path) -> dict[str, Any]:
    from qcompiler.analysis.execute import ort_session
    import qcompiler.models as qm

    bundled = qm.get(name)
    batches, described = calibration_batches(bundled)
    log(f"{name}: calibration {described}")
    float32 = compile_ours(name, work / "float32", "default", None)
    ours = compile_ours(name, work / "w8a8", "w8a8", batches)
    log(f"{name}: ours w8a8 compiled in {ours['compile_s']} s")
    ours_minmax = compile_ours(name, work / "w8a8-minmax", "w8a8{conv-method=calibrated}", batches)
    ort_static = compile_ort_static(float32["model"], work, batches)
    log(f"{name}: ort static quantized in {ort_static['compile_s']} s")
    weights_only = without_activation_quantization(ours["model"], work / "w8a8-float-activations.onnx")
    variants = {"float32": float32, "ours w8a8": ours, "ours w8a8 minmax": ours_minmax, "ort static": ort_static}
    for label, pipeline in MIXED_VARIANTS.items():
        variants[label] = compile_ours(name, work / label.replace(" ", "-").replace(".", ""), pipeline, batches)
        log(f"{name}: {label} compiled in {variants[label]['compile_s']} s, {variants[label]['effective_bits']} bits per weight")
    if args.peers_python:
        variants["nncf"] = compile_nncf(float32["model"], work, batches, args.peers_python)
        log(f"{name}: nncf quantized in {variants['nncf']['compile_s']} s")
    else:
        log(f"{name}: no --peers-python given: the nncf row is left out")
    variants["ours w8a8, float act."] = weights_only
    sessions = {key: (nncf_session if key == "nncf" else lambda p: ort_session(p, common.THREADS))(str(v["model"]))
                for key, v in variants.items()}
    targets = evaluation_targets(bundled, args.count, args.crop)
    log(f"{name}: evaluating on {', '.join(t[0] for t in targets)}")
    scores = quality(sessions, targets, args.sigmas)
    timing = latency({k: v for k, v in sessions.items() if k != "ours w8a8, float act."}, bundled, args.repeats)
    for v in variants.values():
        v["model"] = str(v["model"])
        v["bytes"] = Path(v["model"]).stat().st_size
    drops = {key: {s: round(scores["float32"][s]["psnr"] - scores[key][s]["psnr"], 3) for s in scores["float32"]}
             for key in variants if key != "float32"}
    peers = [key for key in ("ort static", "nncf") if key in drops]
    return {
        "model": name,
        "calibration": described,
        "evaluation_photos": [t[0] for t in targets],
        "evaluation_size": "whole photos" if not args.crop else f"centre {args.crop}x{args.crop}",
        "variants": variants,
        "quality": scores,
        "psnr_drop_vs_float": drops,
        "latency_512": {k: {kk: vv for kk, vv in v.items() if kk != "samples_ms"} for k, v in timing.items()},
        "targets": {
            f"ours w8a8 within {TARGET_DROP_DB} dB of float at every sigma": all(d <= TARGET_DROP_DB for d in drops["ours w8a8"].values()),
            f"ours w8a8 at least as close as {' and '.join(peers)} at every sigma": all(
                drops["ours w8a8"][s] <= drops[peer][s] for s in drops["ours w8a8"] for peer in peers),
            f"ours w8a8 latency <= {TARGET_LATENCY_RATIO}x float": timing["ours w8a8"]["paired_ratio"] <= TARGET_LATENCY_RATIO,
        },
    }


def bench_volume_model(name: str, args, work: Path) -> dict[str, Any]:
    """Dice of brain masks and latency for a 3D segmentation model (deepbet-brain)."""
    from qcompiler.analysis.execute import ort_session
    from qcompiler.models import deepbet
    import qcompiler.models as qm
    from qcompiler.tools.evaluate import dice

    bundled = qm.get(name)
    batches = bundled.calibration_batches()
    described = (f"{len(batches)} volumes ({', '.join(deepbet.CALIBRATION_VOLUMES)}) at {deepbet.SIZE}^3, one batch each")
    log(f"{name}: calibration {described}")
    float32 = compile_ours(name, work / "float32", "default", None)
    ours = compile_ours(name, work / "w8a8", "w8a8", batches, keep_stats=True)
    log(f"{name}: ours w8a8 compiled in {ours['compile_s']} s")
    ort_static = compile_ort_static(float32["model"], work, batches)
    log(f"{name}: ort static quantized in {ort_static['compile_s']} s")
    variants = {"float32": float32, "ours w8a8": ours, "ort static": ort_static}
    sessions = {key: ort_session(str(v["model"]), common.THREADS) for key, v in variants.items()}
    truth = deepbet.reference_mask()
    volumes = bundled.evaluation_volumes()[: args.count] if args.count else bundled.evaluation_volumes()
    scores: dict[str, dict] = {key: {} for key in sessions}
    for volume_name, volume in volumes:
        feeds = deepbet.to_feeds([volume])
        masks = {key: deepbet.brain_mask(session.run(None, feeds)[0])[0] for key, session in sessions.items()}
        for key, mask in masks.items():
            scores[key][volume_name] = {"dice_vs_float": round(dice(mask, masks["float32"]), 5),
                                        "dice_vs_nilearn": round(dice(mask, truth), 5), "voxels": int(mask.sum())}
        log(f"  {volume_name}: " + ", ".join(f"{k} {v[volume_name]['dice_vs_float']:.4f}" for k, v in scores.items()))
    feeds = deepbet.to_feeds([volumes[0][1]])
    runners = {key: (lambda s=session: s.run(None, feeds)) for key, session in sessions.items()}
    load_before = os.getloadavg()
    timing = common.interleaved_latency(runners, warmup=1, repeats=args.repeats, reference="float32")
    load_after = os.getloadavg()
    profiles = {key: op_time_profile(Path(variants[key]["model"]), feeds, work) for key in ("float32", "ours w8a8")} if args.profile else None
    for v in variants.values():
        v["model"] = str(v["model"])
        v["bytes"] = Path(v["model"]).stat().st_size
    worst = {key: min(s["dice_vs_float"] for s in per.values()) for key, per in scores.items()}
    return {
        "model": name,
        "kind": "volume",
        "calibration": described,
        "evaluation_volumes": [v[0] for v in volumes],
        "variants": variants,
        "dice": scores,
        "latency_128": {k: {kk: vv for kk, vv in v.items() if kk != "samples_ms"} for k, v in timing.items()},
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "op_time_profile_ms": profiles,
        "targets": {
            f"ours w8a8 Dice >= {TARGET_DICE} against float's mask": worst["ours w8a8"] >= TARGET_DICE,
            f"ours w8a8 latency <= {TARGET_LATENCY_RATIO}x float": timing["ours w8a8"]["paired_ratio"] <= TARGET_LATENCY_RATIO,
        },
    }


def op_time_profile(model_path: Path, feeds: dict[str, np.ndarray], work: Path, runs: int = 3) -> dict[str, dict]:
    """ONNX Runtime's profiler over `runs` runs of a model (2 threads): per op type, the sum over its
    nodes of each node's median time (ms) and the node count."""
    import json
    import statistics

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = common.THREADS
    options.profile_file_prefix = str(work / f"profile-{model_path.parent.name}")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, tuple[str, list[float]]] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node.setdefault(event["name"], (event["args"]["op_name"], []))[1].append(event["dur"] / 1000)
    totals: dict[str, dict] = {}
    for op, times in per_node.values():
        entry = totals.setdefault(op, {"ms": 0.0, "nodes": 0})
        entry["ms"] += statistics.median(times)
        entry["nodes"] += 1
    return {op: {"ms": round(v["ms"], 1), "nodes": v["nodes"]} for op, v in sorted(totals.items(), key=lambda kv: -kv[1]["ms"])}


def render_volume(r: dict) -> list[str]:
    rows = []
    for key, per in r["dice"].items():
        lat = r["latency_128"][key]
        rows.append([key, *(f"{per[v]['dice_vs_float']:.4f}" for v in r["evaluation_volumes"]),
                     *(f"{per[v]['dice_vs_nilearn']:.4f}" for v in r["evaluation_volumes"]),
                     f"{lat['median_ms']:.0f}", f"{lat['paired_ratio']:.2f}"])
    volumes = r["evaluation_volumes"]
    headers = ["variant", *(f"Dice vs float, {v}" for v in volumes), *(f"Dice vs nilearn, {v}" for v in volumes),
               "median ms 128^3", "x float32"]
    load = r["load_average"]
    return [f"{r['model']} on {', '.join(volumes)} (128^3); calibration: {r['calibration']}",
            common.table(headers, rows),
            f"load average (1 min) {load['before'][0]:.1f} before, {load['after'][0]:.1f} after the timing",
            *(f"profile {key}: " + ", ".join(f"{op} {v['ms']:.0f} ms ({v['nodes']})" for op, v in ops.items())
              for key, ops in (r.get("op_time_profile_ms") or {}).items()),
            "targets: " + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in r["targets"].items()), ""]


def render(results: list[dict]) -> str:
    lines = []
    for r in results:
        if r.get("kind") == "volume":
            lines.extend(render_volume(r))
            continue
        rows = []
        for sigma in r["quality"]["float32"]:
            for key in ("noisy", *r["variants"]):
                q = r["quality"][key][sigma]
                quantized = key not in ("noisy", "float32")
                drop = f"{r['psnr_drop_vs_float'][key][sigma]:.2f}" if quantized else ""
                offset = f"{max(p['offset_max'] for p in q['per_image'].values()):.4f}" if quantized else ""
                removed = f"{np.mean([p['psnr_offset_removed'] for p in q['per_image'].values()]):.2f}" if quantized else ""
                rows.append([sigma, key, f"{q['psnr']:.2f}", drop, f"{q['ssim']:.4f}", offset, removed])
        lines.append(f"{r['model']} on {', '.join(r['evaluation_photos'])} ({r['evaluation_size']})")
        lines.append(common.table(["sigma", "variant", "PSNR dB", "drop dB", "SSIM", "max offset", "PSNR offsets removed"], rows))
        lat = r["latency_512"]
        bits = {k: v.get("effective_bits") for k, v in r["variants"].items()}
        lines.append(common.table(
            ["variant", "stored bits per weight", "median ms 512x512", "x float32"],
            [[k, "" if bits.get(k) is None else f"{bits[k]:.2f}", f"{v['median_ms']:.1f}", f"{v['paired_ratio']:.2f}"] for k, v in lat.items()]))
        lines.append("targets: " + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in r["targets"].items()))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--sigmas", nargs="+", type=float, default=list(SIGMAS))
    parser.add_argument("--count", type=int, help="evaluate on the first N evaluation photos only")
    parser.add_argument("--crop", type=int, help="evaluate on centre crops of this size instead of whole photos")
    parser.add_argument("--repeats", type=int, default=12, help="latency rounds (default 12)")
    parser.add_argument("--peers-python", help="the interpreter with NNCF installed (e.g. .venv-peers/bin/python) for the nncf row")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "imaging.json")
    parser.add_argument("--profile", action="store_true", help="deepbet-brain: also ONNX Runtime's time per op type (float32 and ours)")
    args = parser.parse_args(argv)
    common.quiet()
    threads = common.fix_threads(common.THREADS)
    results = []
    for name, work in common.per_model_folders(args.models):
        results.append((bench_volume_model if name in VOLUME_MODELS else bench_model)(name, args, work))
    text = render(results)
    common.finish_run(args.json, threads, results, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
