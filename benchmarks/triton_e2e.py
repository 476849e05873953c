#!/usr/bin/env python3
"""End-to-end decode throughput of an emitted Triton package against the same model in bf16 torch.

    qcompiler compile smollm2-135m -o build/lm-triton --target triton --pipeline "mixed{avg-bits=3.25}" \\
        --calib ../shared/data/wikitext2-valid-excerpt.txt
    PYTHONUNBUFFERED=1 python3 benchmarks/triton_e2e.py build/lm-triton [--out benchmarks/results]

Batch 1. The bundled SmolLM2 graph has no KV cache, so two figures are reported:
  step_ms      one forward of a single token (M = 1 in every linear: what a decode step with a KV
               cache costs in the linears and everything around them), median of many;
  tokens/s     greedy generation of `--new` tokens after a `--prompt`-token prompt, each step running
               the whole sequence again (M grows from the prompt length), as the graph defines it.
Both run the package's `Model` (float16 activations by default, `--dtype bf16` for bf16) and the
reference `CausalLM` of qcompiler.models.smollm2 in bf16, eager, after a warm-up that includes
Triton's autotuning; then the single-token step is also timed as a CUDA-graph replay
(`Model.capture` for the package), which removes Python and launch overhead from both.

`--synthesize` (for machines that cannot receive the 100+ MB weight file): the package directory
holds `weights.small.safetensors` with the tensors whose values index something (permutations, CSC
outlier structure, integer constants) and every tensor under 64 KiB; the rest is filled in with
random values of the manifest's shapes and dtypes (packed codes: random words; floats: N(0, 0.02)),
which changes no kernel's work. The reference gets its own random bf16 weights.

Writes `<out>/triton_e2e_<gpu>.json` with device, versions and every number.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
               intermediate_size=1536, rope_theta=100000.0, eps=1e-5)  # SmolLM2-135M's GGUF metadata
_ST = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32", "I16": "int16",
       "I8": "int8", "U8": "uint8", "BOOL": "bool", "F64": "float64"}


def load_package(path: Path):
    spec = importlib.util.spec_from_file_location("qc_e2e_pkg", path / "__init__.py", submodule_search_locations=[str(path)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["qc_e2e_pkg"] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def must_keep(name: str, info: dict, limit: int = 1 << 16) -> bool:
    """Tensors whose values index something (permutations, CSC outlier structure, integer constants)
    or that are small; everything else may be random for a throughput measurement."""
    nbytes = info["data_offsets"][1] - info["data_offsets"][0]
    structural = name.endswith(("_perm", "_sp_colptr", "_sp_rows")) or info["dtype"] == "I64"
    return structural or nbytes < limit


def split_small(package: Path) -> None:
    """Write weights.small.safetensors (the tensors `must_keep` keeps) beside weights.safetensors."""
    data = (package / "weights.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    body = data[8 + size:]
    keep, blobs, off = {}, [], 0
    for name in sorted(header):
        s, e = header[name]["data_offsets"]
        if must_keep(name, header[name]):
            keep[name] = {**header[name], "data_offsets": [off, off + e - s]}
            blobs.append(body[s:e])
            off += e - s
    head = json.dumps(keep, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    (package / "weights.small.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def synthesize(package: Path, torch) -> int:
    """weights.safetensors from weights.small.safetensors + random tensors for the rest (see module doc)."""
    manifest = json.loads((package / "manifest.json").read_text())
    data = (package / "weights.small.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    small = json.loads(data[8:8 + size])
    body = data[8 + size:]
    gen = torch.Generator().manual_seed(0)
    header, blobs, off, made = {}, [], 0, 0
    for name in sorted(manifest["tensors"]):
        spec = manifest["tensors"][name]
        if name in small:
            s, e = small[name]["data_offsets"]
            blob = body[s:e]
        else:
            dtype = getattr(torch, _ST[spec["dtype"]])
            shape = spec["shape"]
            if dtype.is_floating_point:
                t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
            elif dtype == torch.int32:
                t = torch.randint(-2 ** 31, 2 ** 31 - 1, shape, generator=gen, dtype=torch.int64).to(torch.int32)
            else:
                t = torch.randint(-100, 100, shape, generator=gen).to(dtype)
            blob = t.contiguous().numpy().tobytes()
            made += 1
        header[name] = {"dtype": spec["dtype"], "shape": spec["shape"], "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    (package / "weights.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return made


def reference_model(torch, dtype):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import qcompiler

    qcompiler.__path__.append(str(ROOT))  # qcompiler.models lives in models/ (the installed layout maps it)
    from qcompiler.models.smollm2 import CausalLM, LlamaConfig

    torch.manual_seed(0)
    model = CausalLM(LlamaConfig(**SMOLLM2))
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    return model.to(device="cuda", dtype=dtype).eval()


def time_steps(fn, torch, n: int) -> list[float]:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def generate(step, ids, new: int, torch):
    for _ in range(new):
        logits = step(ids)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", help="an emitted Triton package of smollm2-135m")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50, help="single-token forwards timed")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="the package's activations")
    ap.add_argument("--synthesize", action="store_true", help="fill in big weights randomly (module doc)")
    ap.add_argument("--split-small", action="store_true", help="only write weights.small.safetensors and exit")
    args = ap.parse_args(argv)
    package = Path(args.package)
    if args.split_small:
        split_small(package)
        return 0
    try:
        import torch
        import triton
    except ImportError as e:
        print(f"triton_e2e: needs torch and triton ({e})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("triton_e2e: no CUDA device; this benchmark times a GPU decode", file=sys.stderr)
        return 2
    synthesized = synthesize(package, torch) if args.synthesize else 0
    pkg = load_package(package)
    act_dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    t0 = time.perf_counter()
    ours = pkg.load("cuda", act_dtype)
    load_s = time.perf_counter() - t0
    ref = reference_model(torch, torch.bfloat16)
    name = torch.cuda.get_device_name()
    report = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
              "python": platform.python_version(), "package_pipeline": ours.manifest.get("pipeline"),
              "package_effective_bits": ours.manifest.get("effective_bits_per_weight"),
              "package_kernels": sorted(ours.manifest["kernels"]), "package_dtype": args.dtype,
              "synthesized_tensors": synthesized, "batch": 1, "prompt": args.prompt, "new_tokens": args.new,
              "load_s": round(load_s, 2), "timing": "eager, torch.cuda.synchronize around each call; medians"}
    gen = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, SMOLLM2["vocab_size"], (1, args.prompt), generator=gen).cuda()
    one = prompt[:, :1]

    def ours_logits(ids):
        return ours(input_ids=ids)["logits"]

    def ref_logits(ids):
        # bf16 weights; autocast keeps the reference's float32 rotary tables and mask from
        # promoting its matmuls to float32
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return ref(ids)

    results = {}
    print(f"loaded in {load_s:.1f} s ({synthesized} tensors synthesized)", flush=True)
    for label, fn in (("package", ours_logits), ("bf16_torch", ref_logits)):
        t = time.perf_counter()
        fn(one)
        print(f"{label}: first single-token call {time.perf_counter() - t:.1f} s", flush=True)
        fn(prompt)  # warm-up: compiles every configuration used below
        generate(fn, prompt, 2, torch)
        warm = time.perf_counter() - t
        steps = time_steps(lambda: fn(one), torch, args.steps)
        gens = time_steps(lambda: generate(fn, prompt, args.new, torch), torch, 3)
        step_ms = statistics.median(steps)
        gen_ms = statistics.median(gens)
        results[label] = {"warmup_s": round(warm, 2), "step_ms": round(step_ms, 3), "step_tokens_per_s": round(1e3 / step_ms, 1),
                          "generate_ms": round(gen_ms, 1), "generate_tokens_per_s": round(args.new * 1e3 / gen_ms, 1)}
        print(f"{label:12s} warm-up {warm:6.1f} s  step {step_ms:7.2f} ms ({1e3 / step_ms:7.1f} tok/s)  "
              f"generate {args.new} tokens {gen_ms:8.1f} ms ({args.new * 1e3 / gen_ms:6.1f} tok/s)", flush=True)
    # CUDA graphs: a single-token step replayed (no Python or launch overhead; fixed shapes)
    graphs = {}
    try:
        replay = ours.capture(input_ids=one)
        graphs["package"] = lambda: replay(input_ids=one)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        report["package_capture_error"] = f"{type(exc).__name__}: {exc}"[:300]
    static_in = one.clone()
    ref_graph = torch.cuda.CUDAGraph()
    ref_logits(static_in)
    torch.cuda.synchronize()
    with torch.cuda.graph(ref_graph):
        ref_logits(static_in)
    graphs["bf16_torch"] = ref_graph.replay
    for label, fn in graphs.items():
        fn()
        ms = statistics.median(time_steps(fn, torch, args.steps))
        results[label]["graph_step_ms"] = round(ms, 4)
        results[label]["graph_step_tokens_per_s"] = round(1e3 / ms, 1)
        print(f"{label:12s} CUDA graph step {ms:7.3f} ms ({1e3 / ms:8.1f} tok/s)", flush=True)
    if "package" in graphs:
        report["speedup_graph_step"] = round(results["bf16_torch"]["graph_step_ms"] / results["package"]["graph_step_ms"], 3)
        # the captured step agrees with the eager one
        eager = ours_logits(one).float()
        captured = replay(input_ids=one)["logits"].float()
        report["graph_vs_eager_max_abs"] = float((eager - captured).abs().max())
    report["results"] = results
    report["speedup_step"] = round(results["bf16_torch"]["step_ms"] / results["package"]["step_ms"], 3)
    report["speedup_generate"] = round(results["bf16_torch"]["generate_ms"] / results["package"]["generate_ms"], 3)
    # the same prompt through both: agreement is not expected with random weights (different weights),
    # but the package's logits must be finite
    report["package_logits_finite"] = bool(torch.isfinite(ours_logits(prompt)).all())
    # profile: where a package step spends its time
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        ours_logits(one)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    cuda_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
    report["package_step_gpu_busy_ms"] = round(cuda_us / 1e3, 3)
    report["package_step_kernel_launches"] = int(sum(e.count for e in events
                                                      if getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) > 0))
    print(json.dumps({k: report.get(k) for k in ("speedup_step", "speedup_generate", "speedup_graph_step",
                                                 "package_step_gpu_busy_ms", "package_step_kernel_launches",
                                                 "package_capture_error")}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "h100" if "H100" in name else ("h200" if "H200" in name else "gpu")
    (out / f"triton_e2e_{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
