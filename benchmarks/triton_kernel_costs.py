#!/usr/bin/env python3
"""The kernel-cost table `allocate-bits{cost=latency}` prices the Triton target with: time per weight
of each route a mixed layer's class takes in the package's one-launch kernel, at M=1, and the fixed
cost of one more class. Needs a CUDA GPU.

    PYTHONUNBUFFERED=1 python3 benchmarks/triton_kernel_costs.py           # writes codegen/triton/kernel_costs.json
    python3 benchmarks/triton_kernel_costs.py --json /tmp/costs.json --n 4096

A route is what `codegen/triton/cost.py` names a class by: `w2`, `w3`, `w4`, `w8` (uniform codes in
the kernel's code width, group 128, fp16 scale and zero), `lut2` .. `lut8` (codebook codes into a
per-column fp16 table) and `fp16` (dense fp16 rows). Each is timed as the package runs a mixed layer
(`kernels.qc_gemm_mixed_a16`, autotuned) holding one class of r input channels and N outputs, for r
in `--rows`: GPU time per call of a CUDA graph that cycles through enough identical weight copies
(>= 200 MB) that every call reads its weights from HBM, median of the replays
(`triton_gemm.graph_time`). Per route, the time per weight b is the slope between the smallest and the
largest r, (t(r_max) - t(r_min)) / ((r_max - r_min) N): the launch and the split-K reduction, paid once
per layer, drop out. The fixed cost of one more class is what a layer of two classes (half the rows
each, two different routes) takes over the mean of the two routes alone at the full r, the median over
route pairs, at least 0.
The table records the device, the versions, every timing and the command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_gemm  # noqa: E402  (the kernels and reference loaded from codegen/triton, without the package)

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "codegen" / "triton" / "kernel_costs.json"
ROUTES = {"w2": ("uniform", 2), "w3": ("uniform", 3), "w4": ("uniform", 4), "w8": ("uniform", 8),
          "lut2": ("codebook", 2), "lut3": ("codebook", 3), "lut4": ("codebook", 4), "lut8": ("codebook", 8),
          "fp16": ("fp16", 16)}
PAIRS = (("w2", "w4"), ("w4", "w8"), ("w3", "fp16"), ("lut3", "w4"))
GROUP = 128
ROTATE_BYTES = 200 * 2 ** 20


def layer_classes(ref, spec, n: int, seed: int):
    """Classes [(route, rows), ...] laid one after the other along K, random codes and metadata."""
    import numpy as np

    rng = np.random.default_rng(seed)
    classes, row = [], 0
    for route, rows in spec:
        kind, bits = ROUTES[route]
        if kind == "uniform":
            g = -(-rows // GROUP)
            arrays = (rng.integers(0, 1 << bits, (rows, n), dtype=np.uint8),
                      (rng.random((g, n), dtype=np.float32) * 0.01 + 0.002).astype(np.float16),
                      rng.integers(0, 1 << bits, (g, n)).astype(np.float16))
        elif kind == "codebook":
            arrays = (rng.integers(0, 1 << bits, (rows, n), dtype=np.uint8),
                      (rng.standard_normal((n, 1 << bits)) * 0.02).astype(np.float16))
        else:
            arrays = ((rng.standard_normal((rows, n)) * 0.02).astype(np.float16),)
        classes.append(ref.MixedClass(kind, bits, row, row + rows, arrays))
        row += rows
    return classes, row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(TABLE), help=f"where to write the table (default {TABLE.relative_to(ROOT)})")
    ap.add_argument("--n", type=int, default=8192, help="output channels of every timed layer")
    ap.add_argument("--rows", default="2048,8192", help="class sizes r (input channels) to time; the slope uses the ends")
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--check", action="store_true",
                    help="check the script on the CPU (TRITON_INTERPRET=1, small shapes, wall-clock times, no table)")
    args = ap.parse_args(argv)
    try:
        import torch
        import triton
    except ImportError as e:
        print(f"triton_kernel_costs: needs torch and triton ({e})", file=sys.stderr)
        return 2
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not (args.check and os.environ.get("TRITON_INTERPRET") == "1"):
        print("triton_kernel_costs: no CUDA device; the table is measured on the GPU the package runs on "
              "(--check with TRITON_INTERPRET=1 runs the script's path on the CPU at small shapes)", file=sys.stderr)
        return 2
    import numpy as np

    qk = triton_gemm._load("qc_triton_kernels", ROOT / "codegen" / "triton" / "kernels.py")
    ref = triton_gemm._load("qc_triton_reference", ROOT / "codegen" / "triton" / "reference.py")
    dev = torch.device("cuda" if on_gpu else "cpu")
    if args.check:
        args.n, args.rows, args.replays = 64, "64,128", 1
    rows_list = sorted(int(r) for r in args.rows.split(","))
    n = args.n
    t0 = time.time()

    def graph_us(calls) -> float:
        if not on_gpu:  # --check: wall clock of one pass, only to run the path
            start = time.perf_counter()
            for f in calls:
                f()
            return (time.perf_counter() - start) / len(calls) * 1e6
        return triton_gemm.graph_time(calls, args.replays) * 1e3

    def time_layer(spec, seed) -> dict:
        classes, k = layer_classes(ref, spec, n, seed)
        layout = ref.pack_mixed(classes, GROUP, n)

        def t(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(dev)

        weights = (t(layout.words), t(layout.tiles), t(layout.seg), t(layout.scale), t(layout.zero), t(layout.lut),
                   t(layout.dense))
        size = sum(w.numel() * w.element_size() for w in weights if w is not None)
        n_copies = max(1, min(48, math.ceil(ROTATE_BYTES / size))) if on_gpu else 1
        copies = [weights] + [tuple(None if w is None else w.clone() for w in weights) for _ in range(n_copies - 1)]
        x = (torch.randn((1, k), device=dev) * 0.5).to(torch.bfloat16)

        def call(w):
            return lambda: qk.qc_gemm_mixed_a16(x, w[0], w[1], w[2], kinds=layout.kinds_mask, group=GROUP, scale=w[3],
                                                zero=w[4], lut=w[5], dense=w[6])

        y = call(copies[0])()
        want = ref.ref_gemm_mixed(x.float().cpu().numpy(), classes, GROUP)
        err = float(np.linalg.norm(y.double().cpu().numpy() - want) / np.linalg.norm(want))
        us = graph_us([call(w) for w in copies])
        label = "+".join(f"{route}:{rows}" for route, rows in spec)
        print(f"  {label:24s} {us:8.2f} us  {size / us / 1e3:7.0f} GB/s  rel_err {err:.1e}", flush=True)
        return {"us": round(us, 3), "bytes": size, "rel_err": err, "ok": bool(err < 2e-2)}

    print(f"device {torch.cuda.get_device_name(dev) if on_gpu else 'cpu (check)'}; torch {torch.__version__}, triton {triton.__version__}; N={n}",
          flush=True)
    timed = {}
    for route in ROUTES:
        for r in rows_list:
            timed[f"{route} r={r}"] = time_layer([(route, r)], seed=r)
    r_min, r_max = rows_list[0], rows_list[-1]
    per_weight_ns = {route: round(max(timed[f"{route} r={r_max}"]["us"] - timed[f"{route} r={r_min}"]["us"], 0.0)
                                  * 1e3 / ((r_max - r_min) * n), 6) for route in ROUTES}
    extra = []
    for a, b in PAIRS:
        two = time_layer([(a, r_max // 2), (b, r_max // 2)], seed=r_max + 1)
        timed[f"{a}+{b} r={r_max}"] = two
        extra.append(two["us"] - (timed[f"{a} r={r_max}"]["us"] + timed[f"{b} r={r_max}"]["us"]) / 2)
    per_class_us = round(max(statistics.median(extra), 0.0), 3)
    if args.check:
        ok = all(v["ok"] for v in timed.values())
        print(f"check: {len(timed)} layers, outputs {'ok' if ok else 'WRONG'}; no table written", flush=True)
        return 0 if ok else 1
    table = {
        "target": "triton",
        "per_weight_ns": per_weight_ns,
        "per_class_us": per_class_us,
        "measured": {
            "command": "python3 benchmarks/triton_kernel_costs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "device": torch.cuda.get_device_name(dev),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "m": 1, "n": n, "rows": rows_list, "group": GROUP,
            "timing": "GPU time per call of a CUDA graph over >= 200 MB of identical weight copies (cold L2), median",
            "extra_class_us": [round(e, 3) for e in extra],
            "all_outputs_ok": all(v["ok"] for v in timed.values()),
            "us": timed,
            "elapsed_s": round(time.time() - t0, 1),
        },
    }
    Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    print("per weight (ns): " + ", ".join(f"{k} {v:.5f}" for k, v in per_weight_ns.items())
          + f"; one more class {per_class_us} us; wrote {args.json}", flush=True)
    return 0 if table["measured"]["all_outputs_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
