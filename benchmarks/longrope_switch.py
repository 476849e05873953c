"""A `longrope` decoder stepped across the positions it was trained on: Phi-4-mini's attention shape
and rotary configuration (hidden 3072, 24 query and 8 key/value heads of 128, the leading 96 values
of each rotated, 4096 trained positions of 131072; 2 layers, seeded random weights and random short
and long factors, as no checkpoint ships offline), compiled with the default pipeline (fused
attention) and stepped through its cache from a prefill of `--prefill` ids to `--length`, against
transformers' own cache stepped the same way (the short factors below position 4096, the long ones
from it on). Prints the logits' largest difference over the largest logit at each step.

    python benchmarks/longrope_switch.py                     # about a minute; JSON in benchmarks/results/longrope_switch.json
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TRAINED = 4096


def build():
    """The transformers Phi-3 model of Phi-4-mini's attention and rotary shape, 2 layers, seeded."""
    import torch
    import transformers

    factors = (torch.rand(2, 48, generator=torch.Generator().manual_seed(3)) * 40 + 1).tolist()
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": TRAINED, "short_factor": factors[0], "long_factor": factors[1]}
    config = transformers.Phi3Config(
        vocab_size=49152, hidden_size=3072, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=24,
        num_key_value_heads=8, max_position_embeddings=131072, original_max_position_embeddings=TRAINED,
        rope_parameters=rope, sliding_window=None, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.Phi3ForCausalLM(config).eval()


def factory():
    from qcompiler.models import smollm2

    return build(), smollm2.tokenizer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=TRAINED - 8)
    parser.add_argument("--length", type=int, default=TRAINED + 14)
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--out", type=Path, default=common.RESULTS / "longrope_switch.json")
    args = parser.parse_args()
    common.quiet()
    threads = common.fix_threads(args.threads)
    import torch
    import transformers

    from qcompiler.codegen.lm_artifact import read_layout
    from qcompiler.driver.compiler import compile as qcompile
    from qcompiler.tools.decode import CachedSession, cached_logits

    sys.modules.setdefault("longrope_switch", sys.modules[__name__])
    with tempfile.TemporaryDirectory(prefix="longrope-") as folder:
        out = Path(folder) / "artifact"
        qcompile("longrope_switch:factory", out, drift=False, threads=args.threads)
        hf = build()
        ids = torch.from_numpy(np.random.default_rng(0).integers(3, 49000, args.length)[None])
        name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"  # transformers 5.x: cache
        cache = {name: transformers.DynamicCache(config=hf.config), "use_cache": True}
        with torch.no_grad():
            rows = [hf(ids[:, : args.prefill], **cache).logits[0, -1:]]
            rows += [hf(ids[:, t : t + 1], **cache).logits[0] for t in range(args.prefill, args.length)]
        theirs = torch.cat(rows).numpy()
        session = CachedSession(out / "model.onnx", read_layout(out), threads=args.threads)
        ours = cached_logits(session, ids[0].numpy(), prefill=args.prefill)[args.prefill - 1 :]
        errors = np.abs(ours - theirs).max(axis=1) / np.abs(theirs).max()
        results = [{"position": args.prefill - 1 + i, "factors": "long" if args.prefill - 1 + i >= TRAINED else "short",
                    "relative_error": float(e)} for i, e in enumerate(errors)]
        text = common.table(["position", "factors", "logits vs transformers"],
                            [[r["position"], r["factors"], f"{r['relative_error']:.1e}"] for r in results])
        common.finish_run(args.out, threads["ort_intra_op"], results, text)


if __name__ == "__main__":
    main()
