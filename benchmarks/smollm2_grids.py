"""SmolLM2-135M: how far its float weights are from 4-bit grids of each shape (round-to-nearest).

The bundled SmolLM2 comes from a Q4_1 file: its transformer weights were stored as 4-bit codes
with an fp16 scale and an fp16 minimum per 32 input channels (per output), its tied embedding / LM
head as 8-bit Q8_0 groups of 32. This script quantizes the float model's linears in torch with
asymmetric min-max grids of a given width, group size (along the input channels) and zero-point
form, the transformer layers and the LM head separately, and prints the perplexity of each variant
(the first `--windows` 256-token windows of the first three quarters of the WikiText excerpt, as in
`mixed_pareto.py`) with its bits per weight (codes + an fp16 scale and an fp16 or a b-bit zero
point per group).

    python benchmarks/smollm2_grids.py [--windows 8]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from common import RESULTS, command_line, fix_threads, git_state, machine, packages, quiet, table, wikitext_split, write_json

# (label, transformer grid, LM head grid); a grid is (bits, group, integer zero points) or None (float)
VARIANTS = (
    ("float", None, None),
    ("transformer 4-bit g32 fp16 zero", (4, 32, False), None),
    ("transformer 4-bit g32 integer zero", (4, 32, True), None),
    ("transformer 4-bit g64 fp16 zero", (4, 64, False), None),
    ("transformer 4-bit g128 fp16 zero", (4, 128, False), None),
    ("LM head 4-bit g32 fp16 zero", None, (4, 32, False)),
    ("LM head 4-bit g128 fp16 zero", None, (4, 128, False)),
)


def grid_bits(grid) -> float:
    bits, group, integer = grid
    return bits + (16 + (bits if integer else 16)) / group


def quantize(w, bits: int, group: int, integer: bool):
    """Asymmetric min-max round-to-nearest of w [out, in] in groups of `group` input channels."""
    import torch

    out = torch.empty_like(w)
    levels = (1 << bits) - 1
    for start in range(0, w.shape[1], group):
        block = w[:, start:start + group].double()
        lo, hi = block.amin(1, keepdim=True), block.amax(1, keepdim=True)
        if integer:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(hi)).half().double()
        zero = -lo / scale
        zero = zero.round().clamp(0, levels) if integer else zero.half().double()
        q = torch.clamp(torch.round(block / scale + zero), 0, levels)
        out[:, start:start + group] = ((q - zero) * scale).float()
    return out


def perplexity(model, rows) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(row[None])[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
            count += len(row) - 1
    return math.exp(nll / count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--output", default=str(RESULTS / "smollm2_grids.json"))
    args = parser.parse_args()
    quiet()
    threads = fix_threads()
    import torch

    from qcompiler.models import smollm2

    cfg, state = smollm2.read_gguf(smollm2.gguf_path())
    head, _ = wikitext_split()
    rows = torch.from_numpy(smollm2.windows(head, 256)[: args.windows])
    results = []
    for label, body, lm_head in VARIANTS:
        start = time.perf_counter()
        model = smollm2.CausalLM(cfg)
        model.load_state_dict(state, strict=False)
        model.lm_head.weight = torch.nn.Parameter(state["lm_head.weight"].clone())  # untied: the head alone
        model.eval()
        counts = {"transformer": 0, "head": 0}
        with torch.no_grad():
            for name, module in model.named_modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                part = "head" if name == "lm_head" else "transformer"
                counts[part] += module.weight.numel()
                grid = lm_head if part == "head" else body
                if grid is not None:
                    module.weight.copy_(quantize(module.weight, *grid))
        ppl = perplexity(model, rows)
        results.append({"variant": label, "transformer_grid": body, "lm_head_grid": lm_head,
                        "transformer_bits": grid_bits(body) if body else 32.0,
                        "lm_head_bits": grid_bits(lm_head) if lm_head else 32.0,
                        "perplexity": round(ppl, 4), "seconds": round(time.perf_counter() - start, 1)})
        print(f"{label}: {ppl:.3f}", flush=True)
    float_ppl = results[0]["perplexity"]
    print(table(["variant", "transformer bits", "LM head bits", "perplexity", "x float"],
                [[r["variant"], f"{r['transformer_bits']:.3f}", f"{r['lm_head_bits']:.3f}", f"{r['perplexity']:.3f}",
                  f"{r['perplexity'] / float_ppl:.4f}"] for r in results]))
    write_json(Path(args.output), {
        "benchmark": "smollm2_grids", "command": command_line(), "machine": machine(), "packages": packages(),
        "threads": threads, "git": git_state(), "windows": int(len(rows)), "weights": counts, "results": results,
    })
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
