"""Decoders users bring: Hugging Face Qwen2, Qwen3, Llama 3, Mistral, Gemma 3, StableLM 2, Pythia, GPT-2 and OPT causal LMs at their real shapes
(seeded random weights: no float checkpoint ships offline; `mistral-0.3b` a small Mistral-shaped one), compiled with a KV cache; decode and
prefill tokens/s per pipeline, and how far each float artifact's logits are from transformers'.

    python benchmarks/hf_decoders.py                                   # qwen2.5-0.5b, qwen3-0.6b; 3 pipelines
    python benchmarks/hf_decoders.py --archs qwen3-0.6b --pipelines "default{attention=as-is},default" --rounds 7
    python benchmarks/hf_decoders.py --archs gemma3-1b --out benchmarks/results/hf_decoders_gemma3.json
    python benchmarks/hf_decoders.py --archs stablelm2-1.6b --out benchmarks/results/hf_decoders_stablelm2.json
    python benchmarks/hf_decoders.py --archs pythia-1b --out benchmarks/results/hf_decoders_pythia.json
    python benchmarks/hf_decoders.py --archs gpt2,opt-125m --out benchmarks/results/hf_decoders_gpt2_opt.json

Each architecture is a `package.module:function` source (this file's `factory_<arch>`) returning
the transformers model (torch.manual_seed(0) init; Qwen2's Q/K/V biases and Qwen3's query/key norm
scales, and Gemma's norm weights, drawn at random too, as transformers starts them at 0 and 1) and SmolLM2's tokenizer, which
writes the calibration windows (`--calib-count` windows of 110 words from the WikiText excerpt's
last quarter). Pipelines: `default{attention=as-is}` (the cache graph as exported), `default`
(`lower-ort`'s decoder kernels: GroupQueryAttention, SkipSimplifiedLayerNormalization, linears of
one input merged), `int4{rounding=nearest}` (every linear symmetric 4-bit in groups of 64, one
MatMulNBits each; round-to-nearest, as GPTQ on random weights only adds compile time).

Speed: batch 1, ONNX Runtime at `--threads` intra-op threads, one session per artifact; each round
runs every artifact once in a rotated order: a prefill of `--prompt-tokens` ids, then `--new-tokens`
single-token steps (`qcompiler.tools.decode.CachedSession`). Medians over `--rounds`. Exactness:
the float artifacts' logits through the cache (a prefill of half the ids, then one step a token)
against transformers' full-sequence logits on the same `--prompt-tokens` ids, as the largest
difference over the largest logit. JSON to `--out` (default benchmarks/results/hf_decoders.json).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# the configurations of the released models (their config.json), weights random; mistral-0.3b is a
# Mistral of 0.33 B weights with a sliding window, its vocabulary that of the tokenizer used here
SHAPES = {
    "qwen2.5-0.5b": ("Qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "qwen3-0.6b": ("Qwen3", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                                 rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "llama3.2-1b": ("Llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                  tie_word_embeddings=True, rms_norm_eps=1e-5,
                                  rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                                   "rope_theta": 500000.0})),
    "mistral-0.3b": ("Mistral", dict(vocab_size=49152, hidden_size=1024, intermediate_size=3584, num_hidden_layers=16,
                                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=32768,
                                      sliding_window=4096, rms_norm_eps=1e-5)),
}
# Gemma 3 1B: every sixth layer global (theta 1e6), the others local (theta 1e4, a window of 512)
_GEMMA3_LAYERS = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)]
SHAPES["gemma3-1b"] = ("Gemma3", dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                      num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                                      max_position_embeddings=32768, sliding_window=512, layer_types=_GEMMA3_LAYERS,
                                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                       "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                                      tie_word_embeddings=True, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2, eos_token_id=1))
# StableLM 2 1.6B: LayerNorms with biases, a quarter of each head rotated, biases on Q, K and V
SHAPES["stablelm2-1.6b"] = ("StableLm", dict(vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                            "partial_rotary_factor": 0.25},
                                           layer_norm_eps=1e-5, use_qkv_bias=True,
                                           use_parallel_residual=False, qk_layernorm=False, tie_word_embeddings=False))
# Pythia 1B (GPT-NeoX): attention and MLP side by side on two LayerNorms, Q, K and V interleaved per head, a quarter of
# each 256-wide head rotated, an exact GELU
SHAPES["pythia-1b"] = ("GPTNeoX", dict(vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                      num_attention_heads=8, max_position_embeddings=2048, rotary_pct=0.25,
                                      rope_theta=10000.0, layer_norm_eps=1e-5, use_parallel_residual=True,
                                      tie_word_embeddings=False))
# GPT-2 (124M): learned positions, LayerNorms, biases, Q, K and V in one Conv1D weight, tanh GELU
SHAPES["gpt2"] = ("GPT2", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024, layer_norm_epsilon=1e-5,
                               activation_function="gelu_new", tie_word_embeddings=True))
# OPT-125m: learned positions (2 rows on), LayerNorms before attention and MLP, biases, ReLU
SHAPES["opt-125m"] = ("OPT", dict(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                                  max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True,
                                  activation_function="relu", tie_word_embeddings=True, pad_token_id=1, bos_token_id=2,
                                  eos_token_id=2))
# the config class where it is not `<family>Config`, the model class where it is not `<family>ForCausalLM`
CONFIG_CLASSES = {"Gemma3": "Gemma3TextConfig"}
MODEL_CLASSES = {"GPT2": "GPT2LMHeadModel"}
DEFAULT_ARCHS = ("qwen2.5-0.5b", "qwen3-0.6b")
PIPELINES = ("default{attention=as-is}", "default", "int4{rounding=nearest}")


def build(arch: str):
    """The transformers model of `arch` with seeded random weights (biases and norm scales included)."""
    import torch
    import transformers

    family, config = SHAPES[arch]
    config = dict(config)
    if "rope_theta" in config and "rope_parameters" not in config:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
    torch.manual_seed(0)
    config_class = getattr(transformers, CONFIG_CLASSES.get(family, f"{family}Config"))
    model = getattr(transformers, MODEL_CLASSES.get(family, f"{family}ForCausalLM"))(config_class(**config)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
            elif family.startswith("Gemma") and name.endswith("norm.weight"):  # scales 1 + weight
                parameter.normal_(0.0, 0.3)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter.normal_(1.0, 0.3)
    return model


def _factory(arch: str):
    def make():
        from qcompiler.models import smollm2

        return build(arch), smollm2.tokenizer()
    return make


for _arch in SHAPES:
    globals()[f"factory_{_arch.replace('.', '_').replace('-', '_')}"] = _factory(_arch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="comma-separated names from: " + ", ".join(SHAPES))
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help="comma-separated pipelines (no commas inside one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--calib-count", type=int, default=8)
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--build", type=Path, help="where the artifacts go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "hf_decoders.json")
    args = parser.parse_args()
    common.quiet()
    threads = common.fix_threads(args.threads)
    import tempfile

    import torch

    from qcompiler.codegen.lm_artifact import read_layout
    from qcompiler.driver.compiler import compile as qcompile
    from qcompiler.tools.decode import CachedSession, cached_logits

    archs, pipelines = args.archs.split(","), args.pipelines.split(",")
    unknown = sorted(set(archs) - set(SHAPES))
    if unknown:
        parser.error(f"unknown architectures {unknown}; choose from {', '.join(SHAPES)}")
    build_dir = args.build or Path(tempfile.mkdtemp(prefix="hf-decoders-"))
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        calib = common.write_lines(build_dir / "calib.txt", common.word_windows(common.wikitext_split()[1], args.calib_count, 110))
        sys.modules.setdefault("hf_decoders", sys.modules[__name__])
        ids = np.random.default_rng(0).integers(100, 20000, args.prompt_tokens + args.new_tokens)
        rows, sessions = [], {}
        for arch in archs:
            reference = None
            for pipeline in pipelines:
                out = build_dir / f"{arch}-{len(rows)}"
                common.log(f"{arch}: compile {pipeline}")
                start = time.perf_counter()
                result = qcompile(f"hf_decoders:factory_{arch.replace('.', '_').replace('-', '_')}", out, pipeline=pipeline,
                                  calibration=None if pipeline.startswith("default") else str(calib), calib_count=args.calib_count,
                                  drift=False, threads=args.threads, force=True)
                row = {"arch": arch, "pipeline": pipeline, "compile_s": round(time.perf_counter() - start, 1),
                       "weight_bytes": result.manifest.get("weight_bytes"),
                       "ops": _op_counts(out)}
                layout = read_layout(out)
                sessions[len(rows)] = CachedSession(out / "model.onnx", layout, args.threads)
                if pipeline.startswith("default"):
                    if reference is None:
                        with torch.no_grad():
                            reference = build(arch)(torch.from_numpy(ids[None, : args.prompt_tokens])).logits[0].numpy()
                    got = cached_logits(sessions[len(rows)], ids[: args.prompt_tokens], args.prompt_tokens // 2)
                    row["logits_vs_transformers"] = float(np.abs(got - reference).max() / np.abs(reference).max())
                rows.append(row)
        common.log(f"timing {len(rows)} artifacts, {args.rounds} rounds")
        decode, prefill = {i: [] for i in sessions}, {i: [] for i in sessions}
        order = list(sessions)
        for r in range(args.rounds):
            for i in order[r % len(order):] + order[: r % len(order)]:
                session = sessions[i]
                session.reset(capacity=len(ids))
                start = time.perf_counter()
                session.step(ids[: args.prompt_tokens])
                middle = time.perf_counter()
                for t in range(args.prompt_tokens, len(ids)):
                    session.step(ids[t : t + 1])
                end = time.perf_counter()
                prefill[i].append(args.prompt_tokens / (middle - start))
                decode[i].append(args.new_tokens / (end - middle))
        for i, row in enumerate(rows):
            row["prefill_tok_s"] = round(float(np.median(prefill[i])), 1)
            row["decode_tok_s"] = round(float(np.median(decode[i])), 2)
            row["decode_tok_s_rounds"] = [round(x, 2) for x in decode[i]]
        text = common.table(
            ["arch", "pipeline", "compile s", "attention", "decode tok/s", "prefill tok/s", "float logits vs transformers"],
            [[r["arch"], r["pipeline"], r["compile_s"], "fused" if r["ops"].get("GroupQueryAttention") else "as exported",
              r["decode_tok_s"], r["prefill_tok_s"], f"{r['logits_vs_transformers']:.1e}" if "logits_vs_transformers" in r else ""]
             for r in rows])
        common.finish_run(args.out, threads["ort_intra_op"], rows, text)
    finally:  # a temporary folder (no --build) goes: each run writes gigabytes of artifacts
        sessions = {}
        if args.build is None:
            shutil.rmtree(build_dir, ignore_errors=True)


def _op_counts(folder: Path) -> dict[str, int]:
    import collections

    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node))


if __name__ == "__main__":
    main()
