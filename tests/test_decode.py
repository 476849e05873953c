"""Causal LMs with a KV cache: capture, calibration steps, `qcompiler generate`, ORT GenAI.

A tiny random Llama (transformers' LlamaConfig, 2 layers, hidden 128) with a word-level tokenizer
comes in as a `package.module:function` source; the real SmolLM2 only in the slow tier.
"""

import inspect
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qcompiler.analysis import execute  # noqa: E402
from qcompiler.codegen.lm_artifact import read_layout  # noqa: E402
from qcompiler.driver.compiler import compile as qcompile  # noqa: E402
from qcompiler.errors import UserError  # noqa: E402
from qcompiler.models.causal_lm import DECODE_STEPS  # noqa: E402
from qcompiler.models.hf_llama import ALIBI_POSITIONS, from_hf  # noqa: E402
from qcompiler.tools.cli import main  # noqa: E402
from qcompiler.tools.decode import CachedSession, cached_logits, generate  # noqa: E402

VOCAB = 128
MAX_POSITIONS = 64
PROMPT = "w1 w2 w3 w4 w5"


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": 3 + i for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_llama():
    """The factory: a random Llama causal LM (untied head, grouped K/V heads) and its tokenizer."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval(), tiny_tokenizer()


def words(count: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"w{i}" for i in rng.integers(0, VOCAB - 3, count))


@pytest.fixture(scope="module")
def factory():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tiny_llama_factory", sys.modules[__name__])
        yield "tiny_llama_factory:tiny_llama"


@pytest.fixture(scope="module")
def float_lm(factory, tmp_path_factory):
    """The cache graph as exported (attention and norms not fused)."""
    return qcompile(factory, tmp_path_factory.mktemp("lm") / "float", pipeline="default{attention=as-is}", drift=False).output


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(words(12 + i % 9, seed=i) for i in range(16)) + "\n")
    return path


def test_cache_graph_layout_and_files(float_lm):
    import onnx

    graph = onnx.load(str(float_lm / "model.onnx"), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    assert inputs == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value",
                      "past_key_values.1.key", "past_key_values.1.value"]
    assert [o.name for o in graph.output] == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    past = graph.input[3].type.tensor_type.shape.dim
    assert past[0].dim_param and past[2].dim_param and past[1].dim_value == 2 and past[3].dim_value == 32
    assert {"tokenizer.json", "genai_config.json"} <= {p.name for p in float_lm.iterdir()}
    manifest = json.loads((float_lm / "manifest.json").read_text())
    assert "tokenizer.json" in manifest["files"] and manifest["causal_lm"]["num_layers"] == 2
    assert json.loads((float_lm / "genai_config.json").read_text())["model"]["decoder"]["num_key_value_heads"] == 2


def test_cache_graph_equals_full_sequence(float_lm):
    hf, _ = tiny_llama()
    ids = np.random.default_rng(1).integers(3, VOCAB, 20)
    with torch.no_grad():
        full = hf(torch.from_numpy(ids[None])).logits[0].numpy()
    session = CachedSession(float_lm / "model.onnx", read_layout(float_lm), threads=1)
    stepped = cached_logits(session, ids, prefill=7)  # 7 tokens at once, then 13 single steps
    np.testing.assert_allclose(stepped, full, atol=2e-5)


def test_greedy_tokens_equal_transformers_generate(float_lm):
    hf, tok = tiny_llama()
    ids = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    result = generate(float_lm, PROMPT, max_new_tokens=12, threads=1)
    assert result["tokens"] == expected.tolist()
    assert result["prompt_tokens"] == 5 and result["prefill_tokens_per_s"] > 0


def test_sampling_is_seeded(float_lm):
    first = generate(float_lm, PROMPT, max_new_tokens=10, temperature=1.5, seed=3, threads=1)["tokens"]
    again = generate(float_lm, PROMPT, max_new_tokens=10, temperature=1.5, seed=3, threads=1)["tokens"]
    greedy = generate(float_lm, PROMPT, max_new_tokens=10, threads=1)["tokens"]
    assert first == again and first != greedy


def test_generate_cli_streams_then_reports_speed(float_lm, capsys):
    assert main(["generate", str(float_lm), "--prompt", PROMPT, "--max-new-tokens", "8", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    expected = generate(float_lm, PROMPT, max_new_tokens=8, threads=1)["text"]
    assert out == expected + "\n" and "prefill" in err and "tokens/s" in err
    assert main(["generate", str(float_lm), "--prompt", PROMPT, "--max-new-tokens", "8", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["text"] == expected and body["decode_tokens_per_s"] > 0


def _no_tokenizer(artifact: Path, tmp: Path) -> Path:
    copy = tmp / "no-tokenizer"
    shutil.copytree(artifact, copy)
    (copy / "tokenizer.json").unlink()
    return copy


def _not_an_lm(artifact: Path, tmp: Path) -> Path:
    copy = tmp / "not-lm"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["causal_lm"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("long prompt", ["--prompt", words(MAX_POSITIONS + 1)], "positions"),
        ("zero tokens", ["--prompt", PROMPT, "--max-new-tokens", "0"], "--max-new-tokens"),
        ("past the positions", ["--prompt", PROMPT, "--max-new-tokens", str(MAX_POSITIONS)], "--max-new-tokens"),
        ("negative temperature", ["--prompt", PROMPT, "--temperature", "-1"], "--temperature"),
        ("no causal LM", ["--prompt", PROMPT], "no causal LM"),
        ("no tokenizer", ["--prompt", PROMPT], "tokenizer.json"),
        ("no folder", ["--prompt", PROMPT], "not a compiled artifact"),
    ],
)
def test_generate_bad_input_exits_2(float_lm, tmp_path, capsys, case, extra, message):
    folder = {"no causal LM": _not_an_lm, "no tokenizer": _no_tokenizer}.get(case, lambda a, t: a)(float_lm, tmp_path)
    if case == "no folder":
        folder = tmp_path / "missing"
    assert main(["generate", str(folder), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_calibration_sees_prefill_and_decode_steps(factory, calib_file):
    hf, tok = tiny_llama()
    lm = from_hf("tiny", hf, tok)
    lm.seq_len = 16
    batches = lm.batches_from_raw([words(16, seed=1), words(9, seed=2)])
    past = [b["past_key_values.0.key"].shape[2] for b in batches]
    assert past == [0, *range(16 - DECODE_STEPS, 16)]
    assert [b["input_ids"].shape[1] for b in batches] == [16 - DECODE_STEPS] + [1] * DECODE_STEPS
    assert batches[-1]["attention_mask"].shape == (2, 16) and batches[-1]["attention_mask"][1].sum() == 9
    assert batches[2]["position_ids"].tolist() == [[13], [13]]


@pytest.mark.parametrize("int_kernels, kernel", [("auto", "MatMulNBits"), ("fused", "MatMulIntegerToFloat")])
def test_w8a8_per_token_compiles_the_cache_graph(factory, calib_file, float_lm, tmp_path, int_kernels, kernel):
    """Per-token W8A8 of a decoder: by default (`int-kernels=auto`) every linear one 8-bit
    MatMulNBits that quantizes its input itself; `fused`, MatMulIntegerToFloat and the row scale."""
    out = qcompile(factory, tmp_path / "w8", pipeline=f"w8a8{{act-mode=per-token int-kernels={int_kernels}}}",
                   calibration=str(calib_file), drift=False).output
    ids = np.random.default_rng(4).integers(3, VOCAB, 16)
    layout = read_layout(out)
    quantized = cached_logits(CachedSession(out / "model.onnx", layout, 1), ids, prefill=8)
    reference = cached_logits(CachedSession(float_lm / "model.onnx", read_layout(float_lm), 1), ids, prefill=8)
    cosine = np.sum(quantized * reference) / np.linalg.norm(quantized) / np.linalg.norm(reference)
    ops = _op_types(out)
    assert kernel in ops and "MatMul" not in ops and cosine > 0.99
    assert ("MatMulIntegerToFloat" in ops) == (int_kernels == "fused")
    assert len(generate(out, PROMPT, max_new_tokens=4, threads=1)["tokens"]) >= 1


@pytest.fixture(scope="module")
def fused_result(factory, tmp_path_factory):
    return qcompile(factory, tmp_path_factory.mktemp("lm") / "fused", pipeline="default{attention=fused}")


@pytest.fixture(scope="module")
def fused_lm(fused_result):
    return fused_result.output


def _nodes(folder: Path) -> list:
    import onnx

    return list(onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


def _op_types(folder: Path) -> list[str]:
    return [n.op_type for n in _nodes(folder)]


def test_fused_attention_is_one_node_a_layer_and_equals_transformers(fused_lm, float_lm):
    """`lower-ort{attention=fused}`: each layer's attention (rotary, cache concat, head repeat, masked
    softmax products) is one GroupQueryAttention reading Q, K and V packed, each RMSNorm of a residual
    sum one SkipSimplifiedLayerNormalization, and the cached logits still equal the torch model's."""
    ops = _op_types(fused_lm)
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops and "Transpose" not in ops
    assert len(ops) < len(_op_types(float_lm)) / 2
    # Q, K and V as one product, the kernel's packed input; each norm of a residual sum one kernel
    import onnx

    nodes = onnx.load(str(fused_lm / "model.onnx"), load_external_data=False).graph.node
    attention = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert all(n.input[1] == "" and n.input[2] == "" for n in attention)
    assert ops.count("SkipSimplifiedLayerNormalization") == 4 and ops.count("Reciprocal") == 0
    hf, _ = tiny_llama()
    ids = np.random.default_rng(1).integers(3, VOCAB, 20)
    with torch.no_grad():
        full = hf(torch.from_numpy(ids[None])).logits[0].numpy()
    stepped = cached_logits(CachedSession(fused_lm / "model.onnx", read_layout(fused_lm), threads=1), ids, prefill=7)
    np.testing.assert_allclose(stepped, full, atol=2e-5)
    assert generate(fused_lm, PROMPT, max_new_tokens=12, threads=1)["tokens"] == \
        generate(float_lm, PROMPT, max_new_tokens=12, threads=1)["tokens"]


def test_fused_attention_writes_the_cache_in_place(fused_lm, float_lm):
    """A GroupQueryAttention artifact says so (`shared_buffer`, and ONNX Runtime GenAI's
    `past_present_share_buffer`): `CachedSession` binds one buffer per cache tensor as past and
    present, grown by doubling when full, with the logits of separate presents, exactly."""
    import dataclasses

    layout = read_layout(fused_lm)
    assert layout.shared_buffer and not read_layout(float_lm).shared_buffer
    assert json.loads((fused_lm / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    ids = np.random.default_rng(7).integers(3, VOCAB, 30)
    apart = cached_logits(CachedSession(fused_lm / "model.onnx", dataclasses.replace(layout, shared_buffer=False), 1), ids, prefill=8)
    session = CachedSession(fused_lm / "model.onnx", layout, 1)
    session.reset(capacity=5)
    in_place = np.concatenate([session.step(ids[:8])] + [session.step(ids[t : t + 1]) for t in range(8, 30)])
    assert session.past["past_key_values.0.key"].shape() == [1, 2, 40, 32]  # 5 -> 10 -> 20 -> 40
    np.testing.assert_array_equal(in_place, apart)


def test_fused_attention_is_measured_on_the_decoders_probe(fused_result):
    """The probe of a decoder is a one-token step after a past (batch 2), which the fused kernel runs:
    drift is measured after `lower-ort` as after every pass, and it is float's."""
    last = fused_result.records[-1]
    assert last.name == "lower-ort" and last.measure_error is None
    assert last.stats["routes"] == {"GroupQueryAttention": 2, "packed QKV": 2, "SkipSimplifiedLayerNormalization": 4,
                                    "RMSNorm as Div (fused by ONNX Runtime)": 1}
    assert last.drift["cosine"] > 0.999999


def test_fused_attention_reads_the_position_ids_it_is_given(fused_lm, float_lm):
    """The rotary angles come from `position_ids` (here shifted by 5), as in the exported graph."""
    layout = read_layout(float_lm)
    runs = {}
    for name, folder in (("float", float_lm), ("fused", fused_lm)):
        session = CachedSession(folder / "model.onnx", layout, threads=1).session
        feeds = {"input_ids": np.array([[5, 9, 14]]), "attention_mask": np.ones((1, 3), np.int64),
                 "position_ids": np.array([[5, 6, 7]])}
        feeds.update({i.name: np.zeros((1, 2, 0, 32), np.float32) for i in session.get_inputs() if i.name.startswith("past")})
        runs[name] = session.run(["logits"], feeds)[0]
    np.testing.assert_allclose(runs["fused"], runs["float"], atol=2e-5)


def test_fused_attention_on_a_mixed_model_keeps_its_outputs(factory, calib_file, tmp_path):
    """The fusion reads the linears' outputs whatever computes them (MatMulNBits here): the same
    allocation with and without it gives the same logits through the cache."""
    spec = "canonicalize,calibrate,allocate-bits{avg-bits=4},quantize-weights,fold-permutation,lower-ort"
    outs = {fused: qcompile(factory, tmp_path / str(fused), pipeline=spec + ("{attention=fused}" if fused else ""),
                            calibration=str(calib_file), drift=False).output for fused in (False, True)}
    assert _op_types(outs[True]).count("GroupQueryAttention") == 2 and "MatMulNBits" in _op_types(outs[True])
    ids = np.random.default_rng(4).integers(3, VOCAB, 16)
    logits = [cached_logits(CachedSession(outs[f] / "model.onnx", read_layout(outs[f]), 1), ids, prefill=8) for f in (False, True)]
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-4)


def test_int4_preset_is_one_uniform_kernel_a_linear(factory, calib_file, float_lm, tmp_path):
    """`int4`: every linear one symmetric 4-bit class rounded by gptq, so each runs as one plain
    MatMulNBits without zero points (Q/K/V packed into the attention, gate and up one wide kernel):
    2 layers x 4 + the head; the cached logits stay close to float's."""
    out = qcompile(factory, tmp_path / "int4", pipeline="int4", calibration=str(calib_file), drift=False).output
    ops = _op_types(out)
    assert ops.count("MatMulNBits") == 9 and "Sum" not in ops and "GatherElements" not in ops
    kernels = [n for n in _nodes(out) if n.op_type == "MatMulNBits"]
    assert all(len(n.input) == 3 for n in kernels)  # symmetric: the kernel's default zero points
    assert ops.count("GroupQueryAttention") == 2 and ops.count("Split") == 2
    manifest = json.loads((out / "manifest.json").read_text())  # the wide kernels' layers and bytes, once each
    layers = manifest["mixed_layers"]
    assert sorted(len(e["layers"]) for e in layers.values() if "layers" in e) == [2, 2, 3, 3]
    assert all(e["bytes_at_rest"] > 0 for e in layers.values()) and len(layers) == 9  # 2 x (QKV, O, gate-up, down) + head
    _assert_each_initializer_counted_once(out, layers)
    ids = np.random.default_rng(5).integers(3, VOCAB, 16)
    got, want = (cached_logits(CachedSession(f / "model.onnx", read_layout(f), 1), ids, prefill=8) for f in (out, float_lm))
    assert execute.drift({"y": want}, {"y": got})["cosine"] > 0.99


def tiny_llama_head_8():
    """A Llama whose heads are 8 wide: ONNX Runtime's GroupQueryAttention takes multiples of 16 only."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS)
    return transformers.LlamaForCausalLM(cfg).eval(), tiny_tokenizer()


def test_fused_attention_leaves_heads_the_kernel_cannot_take(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tiny_llama_head_8_factory", sys.modules[__name__])
    with caplog.at_level("WARNING"):
        result = qcompile("tiny_llama_head_8_factory:tiny_llama_head_8", tmp_path / "h8", pipeline="default{attention=fused}")
    assert "attention=fused found no attention it can fuse" in caplog.text
    assert "GroupQueryAttention" not in _op_types(result.output) and "Softmax" in _op_types(result.output)
    assert result.records[-1].name == "lower-ort" and not result.records[-1].modified


@pytest.mark.parametrize("artifact", ["float_lm", "fused_lm"])
def test_genai_config_loads_in_onnxruntime_genai(artifact, request):
    pytest.importorskip("onnxruntime_genai")
    float_lm = request.getfixturevalue(artifact)
    ours = generate(float_lm, PROMPT, max_new_tokens=10, threads=1)["tokens"]
    assert _genai_greedy(float_lm, PROMPT, 10)[: len(ours)] == ours


def _genai_greedy(artifact: Path, prompt: str, new_tokens: int) -> list[int]:
    """The greedy tokens ONNX Runtime GenAI generates from the artifact by its `genai_config.json`."""
    import onnxruntime_genai as og

    ids = tiny_tokenizer()(prompt, add_special_tokens=False)["input_ids"]
    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def test_factory_causal_lm_needs_its_tokenizer(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiny_llama_bare", type(sys)("tiny_llama_bare"))
    sys.modules["tiny_llama_bare"].build = lambda: tiny_llama()[0]
    with pytest.raises(UserError, match="without its tokenizer"):
        qcompile("tiny_llama_bare:build", "unused-output-dir", drift=False)


# the tiny shape of the Llama-like factories below; each overrides what its architecture needs
TINY_SHAPE = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS)


def _tiny_hf(family: str, draw: tuple[tuple[str, ...], float, float] | None = None, config: str = "", model: str = "",
             **overrides):
    """A seeded random transformers `<family>ForCausalLM` (or `model`) of TINY_SHAPE (with `overrides`) and
    the tiny tokenizer; `draw` = (name endings, mean, std): those parameters drawn from a normal distribution,
    where transformers starts them at a constant (biases at 0, norm scales at 0 or 1)."""
    torch.manual_seed(0)
    cfg = getattr(transformers, config or f"{family}Config")(**{**TINY_SHAPE, **overrides})
    model = getattr(transformers, model or f"{family}ForCausalLM")(cfg).eval()
    if draw is not None:
        endings, mean, std = draw
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(endings):
                    parameter.normal_(mean, std)
    return model, tiny_tokenizer()


def tiny_qwen2():
    """A random Qwen2 causal LM: Llama with biases on Q, K and V (random here: transformers starts them
    at zero), the head tied to the embedding."""
    return _tiny_hf("Qwen2", draw=((".bias",), 0.0, 0.5), tie_word_embeddings=True)


def tiny_mistral():
    """A random Mistral causal LM whose attention slides over 48 of its 64 positions."""
    return _tiny_hf("Mistral", sliding_window=48)


def tiny_qwen3():
    """A random Qwen3 causal LM: each query and key head RMS-normalized before the rotation (random
    scales here), heads 64 wide where hidden / heads is 32, the head tied to the embedding."""
    return _tiny_hf("Qwen3", draw=(("q_norm.weight", "k_norm.weight"), 1.0, 0.3), head_dim=64, tie_word_embeddings=True)


def tiny_llama3():
    """A random Llama with Llama 3.1's scaled rotary frequencies (`rope_type` llama3; the original
    context 16 of 64 positions, so the scaling changes the low frequencies)."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    return _tiny_hf("Llama", tie_word_embeddings=True, rope_parameters=rope)


# Phi-3's, Gemma's, SmolLM3's and OLMo 2's configs name their special tokens
SPECIAL_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_phi3():
    """A random Phi-3 causal LM: Q, K and V one weight, gate and up another; its attention slides over
    40 of its 64 positions."""
    return _tiny_hf("Phi3", sliding_window=40, **SPECIAL_TOKENS)


def tiny_phi4():
    """A random Phi-3 causal LM as Phi-4-mini is one: half of each head rotated (`partial_rotary_factor`),
    `longrope` frequencies trained on 32 of its 64 positions (random short factors; their attention
    factor scales the tables)."""
    factors = torch.rand(2, 8, generator=torch.Generator().manual_seed(1)) * 3 + 1
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 32,
            "short_factor": factors[0].tolist(), "long_factor": factors[1].tolist()}
    return _tiny_hf("Phi3", original_max_position_embeddings=32, sliding_window=None, rope_parameters=rope,
                    tie_word_embeddings=True, **SPECIAL_TOKENS)


def tiny_qwen2_yarn():
    """A random Qwen2 with `yarn` rotary scaling (Qwen2.5's long-context recipe: factor 4 over 16
    original positions), which scales the cos and sin tables too."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
    return _tiny_hf("Qwen2", rope_parameters=rope)


def tiny_qwen2_sliding():
    """A random Qwen2 whose second layer attends over the last 24 positions (`use_sliding_window` from
    `max_window_layers` 1 on), its first over all."""
    return _tiny_hf("Qwen2", use_sliding_window=True, sliding_window=24, max_window_layers=1)


# Gemma's norm weights start at 0 (a scale of 1 + 0): drawn at random
GEMMA_NORMS = (("norm.weight",), 0.0, 0.3)


def tiny_gemma():
    """A random Gemma causal LM: embeddings times sqrt(hidden), norms scaling by 1 + weight (random
    here), a tanh-GELU gate, heads 32 wide where hidden / heads is 16."""
    return _tiny_hf("Gemma", draw=GEMMA_NORMS, hidden_size=64, num_key_value_heads=1, head_dim=32, **SPECIAL_TOKENS)


def tiny_gemma2():
    """A random Gemma 2: sandwich norms (random), scores soft-capped at 2 and logits at 1 (small, so
    that the caps bite on random weights), a softmax scale of 1 / sqrt(48), its first layer sliding
    over 24 positions."""
    return _tiny_hf("Gemma2", draw=GEMMA_NORMS, head_dim=32, query_pre_attn_scalar=48, sliding_window=24,
                    attn_logit_softcapping=2.0, final_logit_softcapping=1.0, **SPECIAL_TOKENS)


def tiny_gemma3():
    """A random Gemma 3 text model: sandwich norms, query and key norms (random), a softmax scale of
    1 / sqrt(48), its first layer local (sliding over 24 positions, theta 10000), its second global
    (theta 1e6, `linear` scaling by 4)."""
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}}
    return _tiny_hf("Gemma3", config="Gemma3TextConfig", draw=GEMMA_NORMS, head_dim=32, query_pre_attn_scalar=48,
                    sliding_window=24, layer_types=["sliding_attention", "full_attention"], rope_parameters=rope,
                    **SPECIAL_TOKENS)


def tiny_granite():
    """A random Granite: embeddings times 12, a softmax scale of 1/64, each block's output times 0.22
    before its residual add, logits divided by 8."""
    return _tiny_hf("Granite", embedding_multiplier=12.0, attention_multiplier=1 / 64, residual_multiplier=0.22,
                    logits_scaling=8.0, tie_word_embeddings=True)


def tiny_smollm3():
    """A random SmolLM3 whose second layer does not rotate its queries and keys (`no_rope_layers`)."""
    return _tiny_hf("SmolLM3", no_rope_layers=[1, 0], **SPECIAL_TOKENS)


def tiny_olmo2():
    """A random OLMo 2: norms after the attention and the MLP only, the whole query and key
    projections RMS-normalized (random scales here)."""
    return _tiny_hf("Olmo2", draw=(("norm.weight",), 1.0, 0.3), **SPECIAL_TOKENS)


# a sliding first layer and a full second one, as Ministral, OLMo 3 and EXAONE 4 name them
SLIDING_THEN_FULL = ["sliding_attention", "full_attention"]


def tiny_ministral():
    """A random Ministral: Mistral whose layers slide by their layer type, here the first over 24 positions."""
    return _tiny_hf("Ministral", head_dim=32, sliding_window=24, layer_types=SLIDING_THEN_FULL)


def tiny_seed_oss():
    """A random Seed-OSS: Llama with biases on Q, K, V and O (random here)."""
    return _tiny_hf("SeedOss", draw=((".bias",), 0.0, 0.5), attention_out_bias=True, **SPECIAL_TOKENS)


def tiny_olmo3():
    """A random OLMo 3: OLMo 2's norms (random scales), its first layer sliding over 24 positions with
    a rotary theta of 10000, its second global with 500000."""
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 500000.0}}
    return _tiny_hf("Olmo3", draw=(("norm.weight",), 1.0, 0.3), sliding_window=24, layer_types=SLIDING_THEN_FULL,
                    rope_parameters=rope, **SPECIAL_TOKENS)


def tiny_exaone4():
    """A random EXAONE 4: norms after the attention and the MLP, each query and key head normalized
    (random scales), its first layer sliding over 24 positions, its second global and unrotated."""
    return _tiny_hf("Exaone4", draw=(("norm.weight",), 1.0, 0.3), sliding_window=24, layer_types=SLIDING_THEN_FULL,
                    **SPECIAL_TOKENS)


def tiny_ernie4_5():
    """A random ERNIE 4.5: each pair of neighbouring values of a head rotated together."""
    return _tiny_hf("Ernie4_5", head_dim=32, **SPECIAL_TOKENS)


def tiny_helium():
    """A random Helium: a Llama whose neighbouring values of a head are rotated as pairs."""
    return _tiny_hf("Helium", head_dim=32, **SPECIAL_TOKENS)


def tiny_stablelm():
    """A random StableLM: LayerNorms with biases (random), biases on Q, K and V, half of each head rotated."""
    return _tiny_hf("StableLm", draw=((".bias", "layernorm.weight", "norm.weight"), 0.5, 0.3), use_qkv_bias=True,
                    partial_rotary_factor=0.5, **SPECIAL_TOKENS)


def _drawn_norms(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its query and key norms' weights (and biases) drawn at random, where transformers starts them at 1 (0)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("q_layernorm", "k_layernorm", "q_norm", "k_norm")):
                parameter.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return model


def tiny_stablelm_qk_norm():
    """StableLM 2 12B's attention: a LayerNorm of each query and key head, a weight for each head (random)."""
    model, tokenizer = _tiny_hf("StableLm", draw=((".bias", "layernorm.weight", "norm.weight"), 0.5, 0.3), use_qkv_bias=True,
                                partial_rotary_factor=0.5, qk_layernorm=True, **SPECIAL_TOKENS)
    return _drawn_norms(model), tokenizer


def tiny_starcoder2():
    """A random StarCoder2: LayerNorms, biases on every linear (random), an MLP without a gate
    (tanh GELU), attention sliding over 48 of its 64 positions."""
    return _tiny_hf("Starcoder2", draw=((".bias", "layernorm.weight", "norm.weight"), 0.5, 0.3), sliding_window=48,
                    **SPECIAL_TOKENS)


def tiny_stablelm_parallel():
    """A random StableLM whose attention and MLP read the same norm side by side (`use_parallel_residual`)."""
    return _tiny_hf("StableLm", draw=((".bias", "layernorm.weight", "norm.weight"), 0.5, 0.3), use_qkv_bias=True,
                    partial_rotary_factor=0.5, use_parallel_residual=True, **SPECIAL_TOKENS)


def tiny_phi():
    """A random Phi-2: LayerNorms, biases on every linear and the head (random), attention and MLP side
    by side on one norm, an MLP without a gate, half of each head rotated."""
    return _tiny_hf("Phi", draw=((".bias", "layernorm.weight"), 0.5, 0.3), partial_rotary_factor=0.5, **SPECIAL_TOKENS)


def tiny_phi_qk_norm():
    """Phi-2 with `qk_layernorm`: one LayerNorm for all query heads and one for all key heads, with biases (random)."""
    model, tokenizer = _tiny_hf("Phi", draw=((".bias", "layernorm.weight"), 0.5, 0.3), partial_rotary_factor=0.5,
                                qk_layernorm=True, **SPECIAL_TOKENS)
    return _drawn_norms(model), tokenizer


def tiny_gpt_neox():
    """A random GPT-NeoX (Pythia's architecture): Q, K and V one weight interleaved per head, LayerNorms
    and biases (random), attention and MLP side by side each on its own norm, an exact GELU, half of
    each head rotated."""
    return _tiny_hf("GPTNeoX", draw=((".bias", "layernorm.weight", "layer_norm.weight"), 0.5, 0.3), rotary_pct=0.5,
                    **SPECIAL_TOKENS)


def tiny_gptj():
    """A random GPT-J: LayerNorms (random), attention and MLP side by side on one norm, an MLP without a
    gate with biases (random), the first 16 values of each head rotated as neighbouring pairs, a biased head."""
    return _tiny_hf("GPTJ", draw=((".bias", "ln_1.weight", "ln_f.weight"), 0.5, 0.3), rotary_dim=16, **SPECIAL_TOKENS)


# GPT-2's, GPT-BigCode's and OPT's LayerNorm scales and biases, drawn
GPT2_NORMS = ((".bias", "ln_1.weight", "ln_2.weight", "ln_f.weight"), 0.5, 0.3)


def tiny_gpt2():
    """A random GPT-2: a learned table of positions and no rotation, LayerNorms, biases everywhere (random), Q, K
    and V one weight stored [in, out] as all its linears, an MLP without a gate (tanh GELU), 4 heads of 32."""
    return _tiny_hf("GPT2", draw=GPT2_NORMS, model="GPT2LMHeadModel", n_inner=256, **SPECIAL_TOKENS)


def tiny_gpt_bigcode():
    """A random GPT-BigCode (StarCoder 1's architecture): GPT-2's with one K/V head (`multi_query`) and
    linears stored [out, in]."""
    return _tiny_hf("GPTBigCode", draw=GPT2_NORMS, n_inner=256, **SPECIAL_TOKENS)


def tiny_gpt_bigcode_mha():
    """A random GPT-BigCode with a K/V head per query head: Q, K and V interleaved per head in one weight."""
    return _tiny_hf("GPTBigCode", draw=GPT2_NORMS, n_inner=256, multi_query=False, **SPECIAL_TOKENS)


def tiny_opt():
    """A random OPT: a learned table of positions (looked up 2 rows on), LayerNorms and biases (random), an
    MLP without a gate (ReLU)."""
    return _tiny_hf("OPT", draw=((".bias", "norm.weight"), 0.5, 0.3), ffn_dim=256, word_embed_proj_dim=128,
                    **SPECIAL_TOKENS)


def tiny_opt_350m():
    """A random OPT shaped as OPT-350m: norms after the residual adds (`do_layer_norm_before` false), so no final
    norm, and token embeddings 64 wide projected to the hidden 128 and back (`word_embed_proj_dim`)."""
    return _tiny_hf("OPT", draw=((".bias", "norm.weight"), 0.5, 0.3), ffn_dim=256, word_embed_proj_dim=64,
                    do_layer_norm_before=False, **SPECIAL_TOKENS)


def tiny_opt_unscaled():
    """A random OPT whose LayerNorms learn neither weight nor bias (`layer_norm_elementwise_affine` false)."""
    return _tiny_hf("OPT", draw=((".bias",), 0.5, 0.3), ffn_dim=256, word_embed_proj_dim=128, layer_norm_elementwise_affine=False,
                    **SPECIAL_TOKENS)


def tiny_cohere():
    """A random Cohere (Command R's architecture): LayerNorms without a bias (random scales), attention and a
    gated MLP side by side on one norm, neighbouring values rotated as pairs, logits times 0.5."""
    return _tiny_hf("Cohere", draw=(("layernorm.weight", "norm.weight"), 0.5, 0.3), logit_scale=0.5, **SPECIAL_TOKENS)


def tiny_persimmon():
    """A random Persimmon: GPT-NeoX's Q, K and V layout, a LayerNorm of each query and key head (one for all heads,
    with a bias), half of each head rotated, LayerNorms and biases (random), ReLU squared."""
    model, tokenizer = _tiny_hf("Persimmon", draw=((".bias", "layernorm.weight"), 0.5, 0.3), **SPECIAL_TOKENS)
    return _drawn_norms(model), tokenizer


def tiny_cohere_qk_norm():
    """Cohere with `use_qk_norm` (Command R+'s attention): a LayerNorm of each query and key head without a bias, a
    weight for each head (random)."""
    model, tokenizer = _tiny_hf("Cohere", draw=(("layernorm.weight", "norm.weight"), 0.5, 0.3), logit_scale=0.5, use_qk_norm=True,
                                **SPECIAL_TOKENS)
    return _drawn_norms(model), tokenizer


def tiny_arcee():
    """A random Arcee: Llama with an MLP without a gate and ReLU squared."""
    return _tiny_hf("Arcee", **SPECIAL_TOKENS)


def tiny_nemotron():
    """A random Nemotron: LayerNorms that scale by 1 + weight (random, as their biases), an MLP without a gate
    and ReLU squared, half of each head rotated."""
    return _tiny_hf("Nemotron", draw=((".bias", "layernorm.weight", "norm.weight"), 0.0, 0.3), **SPECIAL_TOKENS)


def tiny_cohere2():
    """A random Cohere 2: Cohere's block, its first layer sliding over 24 positions and rotated, its second
    global and unrotated."""
    return _tiny_hf("Cohere2", draw=(("layernorm.weight", "norm.weight"), 0.5, 0.3), logit_scale=0.5, sliding_window=24,
                    layer_types=SLIDING_THEN_FULL, **SPECIAL_TOKENS)


def tiny_glm():
    """A random GLM: gate and up in one weight, biases on Q, K and V (random), half of each head rotated as
    neighbouring pairs."""
    return _tiny_hf("Glm", draw=((".bias",), 0.0, 0.5), head_dim=32, **SPECIAL_TOKENS)


def tiny_glm4():
    """A random GLM-4: GLM's with norms after the attention and the MLP too (random scales)."""
    return _tiny_hf("Glm4", draw=((".bias", "layernorm.weight"), 0.5, 0.3), head_dim=32, **SPECIAL_TOKENS)


def tiny_falcon():
    """A random Falcon (Falcon-7B's layout): one K/V head (`multi_query`), Q, K and V in one weight,
    attention and MLP side by side on one LayerNorm (random), no biases, an exact GELU."""
    return _tiny_hf("Falcon", draw=(("layernorm.weight", "ln_f.weight"), 0.5, 0.3), **SPECIAL_TOKENS)


def tiny_falcon_new():
    """A random Falcon of its new architecture (Falcon-40B's layout): 2 K/V groups, each group's queries,
    key and value in turn in one weight, side by side on two LayerNorms, biases (random)."""
    return _tiny_hf("Falcon", draw=((".bias", "ln_attn.weight", "ln_mlp.weight", "ln_f.weight"), 0.5, 0.3),
                    new_decoder_architecture=True, num_kv_heads=2, bias=True, **SPECIAL_TOKENS)


def tiny_falcon_sequential():
    """A random Falcon with attention then MLP, each on its own LayerNorm, and a K/V head per query head
    (Q, K and V interleaved per head), biases (random)."""
    return _tiny_hf("Falcon", draw=((".bias", "layernorm.weight", "ln_f.weight"), 0.5, 0.3), parallel_attn=False,
                    multi_query=False, bias=True, **SPECIAL_TOKENS)


def _randomized(model: torch.nn.Module, endings: tuple[str, ...]) -> torch.nn.Module:
    """`model` (in eval mode) with the parameters whose names end with `endings` drawn at random, where transformers
    starts them at a constant: weights from N(0.5, 0.3), biases from N(0, 0.3)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(endings):
                parameter.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)
    return model.eval()


def tiny_bloom():
    """A random BLOOM: ALiBi (no rotation; 16 heads 16 wide, slopes 2^(-k/2)), its token embeddings LayerNorm-ed, Q, K and V interleaved per head in
    one weight, LayerNorms and biases (random), a tanh-GELU MLP without a gate, 4 x hidden wide; its config
    names no position limit."""
    torch.manual_seed(0)
    cfg = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=256, n_layer=2, n_head=16, **SPECIAL_TOKENS)
    return _randomized(transformers.BloomForCausalLM(cfg), (".bias", "layernorm.weight", "ln_f.weight")), tiny_tokenizer()


def tiny_falcon_alibi():
    """A random Falcon-RW-like model: ALiBi (its slopes and their products with the positions rounded to
    bfloat16, then scaled by 1 / sqrt(head size); 16 heads 16 wide, whose slopes 2^(-k/2) bfloat16 does not hold
    exactly), attention then MLP, a K/V head per query head, biases (random)."""
    return _tiny_hf("Falcon", draw=((".bias", "layernorm.weight", "ln_f.weight"), 0.5, 0.3), alibi=True, parallel_attn=False,
                    multi_query=False, bias=True, hidden_size=256, num_attention_heads=16, **SPECIAL_TOKENS)


def tiny_gpt_neo():
    """A random GPT-Neo: learned positions, scores not scaled, a global layer and a local one that sees its last
    24 of 64 positions, LayerNorms and biases (random), a tanh-GELU MLP without a gate."""
    return _tiny_hf("GPTNeo", draw=((".bias", "ln_1.weight", "ln_2.weight", "ln_f.weight"), 0.5, 0.3),
                    config="GPTNeoConfig", model="GPTNeoForCausalLM", num_layers=2, num_heads=4, window_size=24,
                    attention_types=[[["global", "local"], 1]], **SPECIAL_TOKENS)


def tiny_mpt():
    """A random MPT: ALiBi (16 heads 16 wide, `alibi_bias_max` 8), Q, K and V one after the other in one weight,
    LayerNorms without biases (random scales), no biases, an exact-GELU MLP 4 x hidden wide."""
    torch.manual_seed(0)
    cfg = transformers.MptConfig(vocab_size=VOCAB, d_model=256, n_heads=16, n_layers=2, max_seq_len=MAX_POSITIONS, **SPECIAL_TOKENS)
    return _randomized(transformers.MptForCausalLM(cfg), ("norm_1.weight", "norm_2.weight", "norm_f.weight")), tiny_tokenizer()


def tiny_codegen():
    """A random CodeGen: GPT-J's block (the leading 16 values of each head rotated as neighbouring pairs, attention
    and MLP side by side on one LayerNorm, random), Q, K and V in one weight over 4 shards, a biased head."""
    torch.manual_seed(0)
    cfg = transformers.CodeGenConfig(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, rotary_dim=16, n_positions=MAX_POSITIONS,
                                     n_ctx=MAX_POSITIONS, **SPECIAL_TOKENS)
    return _randomized(transformers.CodeGenForCausalLM(cfg), (".bias", "ln_1.weight", "ln_f.weight")), tiny_tokenizer()


def tiny_olmo():
    """A random OLMo (1): LayerNorms that learn neither weight nor bias."""
    return _tiny_hf("Olmo", **SPECIAL_TOKENS)


def tiny_apertus():
    """A random Apertus: an MLP without a gate, xIELU with slopes drawn per layer, Qwen3's query and key norms (random),
    `llama3` rotary scaling."""
    model, tokenizer = _tiny_hf("Apertus", draw=(("q_norm.weight", "k_norm.weight", ".alpha_p", ".alpha_n"), 0.5, 0.3),
                                **SPECIAL_TOKENS)
    return model.float(), tokenizer


def tiny_hunyuan():
    """A random HunYuan (dense): each query and key head normalized after the rotation (random scales), the rotation's
    theta NTK-scaled by `alpha`."""
    return _tiny_hf("HunYuanDenseV1", draw=(("query_layernorm.weight", "key_layernorm.weight"), 1.0, 0.3), head_dim=32,
                    rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0, "factor": 1.0},
                    **SPECIAL_TOKENS)


def tiny_mixtral():
    """A random Mixtral: 4 experts of 128 channels, 2 a token, their weights one tensor each for gate/up and down;
    attention sliding over 24 positions on every layer."""
    return _tiny_hf("Mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=128, sliding_window=24,
                    **SPECIAL_TOKENS)


def tiny_qwen3_moe():
    """A random Qwen3-MoE: Qwen3's attention (random norm scales), its first layer a plain MLP (`mlp_only_layers`),
    its second 4 experts of 128 channels, 2 a token, their kept scores renormalized (`norm_topk_prob`, as Qwen3-30B-A3B)."""
    return _tiny_hf("Qwen3Moe", draw=(("q_norm.weight", "k_norm.weight"), 1.0, 0.3), num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=128, mlp_only_layers=[0], norm_topk_prob=True, head_dim=32, **SPECIAL_TOKENS)


def tiny_qwen2_moe():
    """A random Qwen2-MoE: biases on Q, K and V (random), 4 experts of 128 channels, 2 a token, and a shared
    expert of 128 channels gated by a sigmoid."""
    return _tiny_hf("Qwen2Moe", draw=((".bias",), 0.0, 0.5), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                    shared_expert_intermediate_size=128, **SPECIAL_TOKENS)


def tiny_bloom_norm_residual():
    """`tiny_bloom` whose residuals are its norms' outputs (`apply_residual_connection_post_layernorm`)."""
    torch.manual_seed(0)
    cfg = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=256, n_layer=2, n_head=16,
                                   apply_residual_connection_post_layernorm=True, **SPECIAL_TOKENS)
    return _randomized(transformers.BloomForCausalLM(cfg), (".bias", "layernorm.weight", "ln_f.weight")), tiny_tokenizer()


def tiny_olmo_clip():
    """A random OLMo (1) whose Q, K and V are clamped to [-0.05, 0.05] (`clip_qkv`; small, so that it bites)."""
    return _tiny_hf("Olmo", clip_qkv=0.05, **SPECIAL_TOKENS)


def tiny_olmoe_clip():
    """A random OLMoE whose Q, K and V are clamped after its query and key projections' norms (`clip_qkv`)."""
    return _tiny_hf("Olmoe", draw=(("q_norm.weight", "k_norm.weight"), 1.0, 0.3), num_experts=4, num_experts_per_tok=2,
                    intermediate_size=128, clip_qkv=0.5, **SPECIAL_TOKENS)


def tiny_mpt_clip():
    """`tiny_mpt` with its fused Q, K and V clamped to [-0.05, 0.05] (`attn_config.clip_qkv`)."""
    torch.manual_seed(0)
    cfg = transformers.MptConfig(vocab_size=VOCAB, d_model=256, n_heads=16, n_layers=2, max_seq_len=MAX_POSITIONS,
                                 attn_config={"clip_qkv": 0.05}, **SPECIAL_TOKENS)
    return _randomized(transformers.MptForCausalLM(cfg), ("norm_1.weight", "norm_2.weight", "norm_f.weight")), tiny_tokenizer()


def tiny_olmoe():
    """A random OLMoE: norms of the whole query and key projections (random scales), 4 experts of 128 channels, 2 a
    token, their kept scores not renormalized (as OLMoE ships)."""
    return _tiny_hf("Olmoe", draw=(("q_norm.weight", "k_norm.weight"), 1.0, 0.3), num_experts=4, num_experts_per_tok=2,
                    intermediate_size=128, **SPECIAL_TOKENS)


def tiny_llama_mlp_bias():
    """A random Llama with `mlp_bias`: gate, up and down each add a (random) bias."""
    return _tiny_hf("Llama", draw=((".bias",), 0.0, 0.5), mlp_bias=True)


def tiny_llama_dynamic():
    """A random Llama with `dynamic` rotary scaling, which keeps theta's frequencies within its positions."""
    return _tiny_hf("Llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})


def tiny_llama_bias():
    """A random Llama with `attention_bias`: Q, K, V and O each add a (random) bias."""
    return _tiny_hf("Llama", draw=((".bias",), 0.0, 0.5), attention_bias=True)


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "llama_like_factory", sys.modules[__name__])
        yield tmp_path_factory.mktemp("llama-like")


def _llama_like_artifact(folder: Path, arch: str) -> Path:
    """`tiny_<arch>` compiled with the default pipeline, once per module (the tests below share it)."""
    if not (folder / arch / "model.onnx").is_file():
        qcompile(f"llama_like_factory:tiny_{arch}", folder / arch, drift=False)
    return folder / arch


def slow(*row):
    """A row of the test below run in the slow tier: its family's paths are also covered by the rows that
    stay in the default one (pairs rotated, Q/K/V layouts, side-by-side blocks, ReLU squared, experts)."""
    return pytest.param(*row, marks=pytest.mark.slow)


@pytest.mark.parametrize("arch, windows, query, matmuls", [
    ("qwen2", [0, 0], "Add", 5), ("mistral", [48, 48], "MatMul", 5),
    ("qwen3", [0, 0], "Reshape", 7), ("llama3", [0, 0], "MatMul", 5),
    slow("llama_bias", [0, 0], "Add", 5), ("phi3", [40, 40], "MatMul", 5),
    ("phi4", [0, 0], "MatMul", 5), slow("qwen2_yarn", [0, 0], "Add", 5),
    slow("llama_dynamic", [0, 0], "MatMul", 5), ("qwen2_sliding", [0, 24], "Add", 5),
    slow("gemma", [0, 0], "MatMul", 5), ("gemma2", [24, 0], "MatMul", 5),
    ("gemma3", [24, 0], "Reshape", 7), ("granite", [0, 0], "MatMul", 5),
    slow("smollm3", [0, 0], "MatMul", 5), ("olmo2", [0, 0], "Mul", 7),
    slow("ministral", [24, 0], "MatMul", 5), ("seed_oss", [0, 0], "Add", 5),
    slow("olmo3", [24, 0], "Mul", 7), ("exaone4", [24, 0], "Reshape", 7),
    slow("ernie4_5", [0, 0], "MatMul", 5), slow("helium", [0, 0], "MatMul", 5),
    slow("stablelm", [0, 0], "Add", 5), slow("starcoder2", [48, 48], "Add", 4),
    ("llama_mlp_bias", [0, 0], "MatMul", 5), slow("stablelm_parallel", [0, 0], "Add", 5),
    ("phi", [0, 0], "Add", 4), ("gpt_neox", [0, 0], "Add", 4),
    ("gpt2", [0, 0], "Add", 4), slow("gpt_bigcode", [0, 0], "Add", 4), ("opt", [0, 0], "Add", 4),
    ("nemotron", [0, 0], "MatMul", 4), ("cohere2", [24, 0], "MatMul", 5), ("glm4", [0, 0], "Add", 5),
    ("falcon", [0, 0], "MatMul", 4), ("falcon_new", [0, 0], "Add", 4), ("olmo", [0, 0], "MatMul", 5),
    ("apertus", [0, 0], "Reshape", 6), ("hunyuan", [0, 0], "Reshape", 7), ("gpt_neo", [0, 24], "MatMul", 4), ("codegen", [0, 0], "MatMul", 4),
    ("mixtral", [24, 24], "MatMul", 15), ("qwen2_moe", [0, 0], "Add", 19),  # MoE: a router and 4 experts a layer
    slow("gptj", [0, 0], "MatMul", 4), slow("gpt_bigcode_mha", [0, 0], "Add", 4), slow("opt_unscaled", [0, 0], "Add", 4),
    ("opt_350m", [0, 0], "Add", 4),
    slow("cohere", [0, 0], "MatMul", 5), slow("arcee", [0, 0], "MatMul", 4), slow("glm", [0, 0], "Add", 5),
    slow("falcon_sequential", [0, 0], "Add", 4), slow("olmoe", [0, 0], "Mul", 17),
    slow("qwen3_moe", [0, 0], "Reshape", 12)])  # its (7 + 17) / 2: a plain layer and one of experts
def test_llama_like_decoders_decode_with_a_cache_as_transformers_computes(llama_like, arch, windows, query, matmuls):
    """Qwen2, Qwen3, Mistral, Phi-3 (fused Q/K/V and gate/up weights, split at load) and Llama 3 (scaled
    rotary frequencies), Phi-4-mini-like (half of each head rotated, `longrope`: its prefill reaches
    beyond the positions it was trained on, so that every position rotates by the long factors, as in
    transformers' full sequence), Qwen2 with `yarn` and Llama with `dynamic` scaling, Gemma, Gemma 2 (soft-capped
    scores and logits), Gemma 3 (a local layer with its own theta and window, a global one scaled),
    Granite (scalar multipliers), SmolLM3 (a layer without rotation), OLMo 2 (post-norms only,
    norms of the whole query and key projections, read by the kernel), Ministral (sliding by layer
    type), Seed-OSS (Q, K, V and O biases), OLMo 3 (OLMo 2 with a sliding layer of its own theta) and
    EXAONE 4 (post-norms, query and key head norms, a sliding layer and an unrotated global one), ERNIE
    4.5 and Helium (neighbouring values rotated as pairs: the kernel's `rotary_interleaved`), StableLM
    (LayerNorms, a partial rotation; and with attention and MLP side by side), StarCoder2 (LayerNorms,
    biases everywhere, an MLP without a gate: 4 linears a layer), Phi-2 (StarCoder2's with attention
    and MLP side by side on one norm, a biased head), GPT-NeoX (Q, K and V interleaved per head, side by
    side on two norms), GPT-J (Phi-2's block, pairs rotated), GPT-2, GPT-BigCode and OPT (learned positions,
    no rotation: the kernel's do_rotary 0; OPT-350m's norms after the residual adds, its embeddings projected in and out), Cohere (side by side, pairs rotated, scaled logits), Cohere 2 (also
    a sliding layer and an unrotated global one), Arcee and Nemotron (ReLU squared), GLM and GLM-4 (fused gate
    and up, pairs of half of each head rotated; GLM-4's sandwich norms), Falcon (its three Q/K/V layouts, side
    by side on one or two norms, or one after the other), HunYuan (query and key heads normalized after their rotation: the
    kernel reads them so and rotates nothing), GPT-Neo (unscaled scores, a local layer: a window), CodeGen
    (GPT-J's block, Q, K and V over 4 shards) and Llama with MLP biases factories compile to the decoder with a
    KV cache and fused attention, the cached logits those of transformers' full sequence, ONNX Runtime GenAI's configuration naming
    the architecture: Q, K and V read packed by the attention (Qwen2's three biases one Add of their
    concatenation before it); Qwen3's normalized query and key heads flattened back into its query and
    key inputs (each norm run before the heads' transpose); a sliding layer's attention (Mistral's,
    Phi-3's, one of Qwen2's two) a kernel over its last W positions."""
    family = {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "phi3": "Phi3", "llama3": "Llama", "llama_bias": "Llama",
              "phi4": "Phi3", "qwen2_yarn": "Qwen2", "llama_dynamic": "Llama", "qwen2_sliding": "Qwen2", "gemma": "Gemma",
              "gemma2": "Gemma2", "gemma3": "Gemma3Text", "granite": "Granite", "smollm3": "SmolLM3",
              "olmo2": "Olmo2", "ministral": "Ministral", "seed_oss": "SeedOss", "olmo3": "Olmo3", "exaone4": "Exaone4",
              "ernie4_5": "Ernie4_5", "helium": "Helium", "stablelm": "StableLm", "starcoder2": "Starcoder2",
              "llama_mlp_bias": "Llama", "stablelm_parallel": "StableLm", "phi": "Phi", "gpt_neox": "GPTNeoX", "gptj": "GPTJ",
              "gpt2": "GPT2", "gpt_bigcode": "GPTBigCode", "gpt_bigcode_mha": "GPTBigCode", "opt": "OPT", "opt_unscaled": "OPT", "opt_350m": "OPT", "cohere": "Cohere",
              "arcee": "Arcee", "nemotron": "Nemotron", "cohere2": "Cohere2", "glm": "Glm", "glm4": "Glm4", "falcon": "Falcon",
              "falcon_new": "Falcon", "falcon_sequential": "Falcon", "mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe", "olmo": "Olmo", "apertus": "Apertus",
              "qwen2_moe": "Qwen2Moe", "hunyuan": "HunYuanDenseV1", "gpt_neo": "GPTNeo", "codegen": "CodeGen",
              "olmoe": "Olmoe"}[arch]
    if not hasattr(transformers, f"{family}Config"):
        pytest.skip(f"this transformers version has no {family}")
    # the names ONNX Runtime GenAI knows (from_hf's GENAI_TYPES)
    model_type = {"Gemma3Text": "gemma3_text", "Olmo2": "olmo", "Olmo3": "olmo", "Ministral": "mistral", "SeedOss": "llama",
                  "Exaone4": "llama", "Helium": "llama", "StableLm": "llama", "Starcoder2": "llama",
                  "Phi": "llama", "GPTNeoX": "llama", "GPTJ": "llama", "GPT2": "llama", "GPTBigCode": "llama", "OPT": "llama",
                  "Cohere": "llama", "Arcee": "llama", "Nemotron": "llama", "Cohere2": "llama", "Glm": "llama", "Glm4": "llama",
                  "Falcon": "llama", "Mixtral": "mistral", "Qwen2Moe": "qwen2", "Apertus": "llama", "HunYuanDenseV1": "llama", "Qwen3Moe": "qwen3", "GPTNeo": "llama", "CodeGen": "llama",
                  "Olmoe": "olmo"}.get(family, family.lower())
    out = _llama_like_artifact(llama_like, arch)
    nodes = _nodes(out)
    producers = {o: n for n in nodes for o in n.output}
    attention = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2 and all((n.input[1] == "") == (arch not in ("qwen3", "gemma3", "olmo2", "olmo3", "exaone4", "qwen3_moe",
                                                                           "olmoe", "apertus", "hunyuan"))
                                       for n in attention)
    assert [producers[n.input[0]].op_type for n in attention] == [query] * 2
    assert [next((a.i for a in n.attribute if a.name == "local_window_size"), 0) for n in attention] == windows
    assert [next((a.f for a in n.attribute if a.name == "softcap"), 0.0) for n in attention] == [2.0 if arch == "gemma2" else 0.0] * 2
    assert [next(a.i for a in n.attribute if a.name == "do_rotary") for n in attention] == \
        ([1, 0] if arch in ("smollm3", "exaone4", "cohere2") else [0, 0] if arch in (*LEARNED_POSITIONS, "hunyuan") else [1, 1])
    rotated = [n for n in attention if next(a.i for a in n.attribute if a.name == "do_rotary")]
    assert {next(a.i for a in n.attribute if a.name == "rotary_interleaved") for n in rotated} == \
        ({int(arch in ("ernie4_5", "helium", "gptj", "cohere", "cohere2", "glm", "glm4", "codegen"))} if rotated else set())
    # (QKV or Q, K, V), O, (gate, up or c_fc), down; the head; OPT-350m's embedding projections in and out
    assert sum(n.op_type == "MatMul" for n in nodes) == 2 * matmuls + 1 + 2 * (arch == "opt_350m")
    routers = {"mixtral": 2, "qwen3_moe": 1, "olmoe": 2, "qwen2_moe": 2}.get(arch, 0)  # a mixture of experts' scores are a Softmax
    assert sum(n.op_type == "Softmax" for n in nodes) == routers
    layout = read_layout(out)
    assert (layout.model_type, layout.max_positions) == (model_type, MAX_POSITIONS)
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == layout.model_type
    hf, _ = globals()[f"tiny_{arch}"]()
    if arch == "llama3":  # the scaled frequencies are what transformers runs, not theta's own
        theta_own = 1.0 / 500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32)
        assert not torch.allclose(hf.model.rotary_emb.inv_freq, theta_own)
    ids = np.random.default_rng(1).integers(3, VOCAB, MAX_POSITIONS)
    with torch.no_grad():
        full = hf(torch.from_numpy(ids[None])).logits[0].numpy()
    prefill = 40 if arch == "phi4" else 7
    stepped = cached_logits(CachedSession(out / "model.onnx", layout, threads=1), ids, prefill=prefill)
    np.testing.assert_allclose(stepped, full, atol=5e-5 * np.abs(full).max())


LEARNED_POSITIONS = ("gpt2", "gpt_bigcode", "gpt_bigcode_mha", "opt", "opt_unscaled", "opt_350m", "gpt_neo")


def test_falcon_alibi_bias_is_transformers_own_over_its_positions():
    """Falcon-RW's ALiBi bias over 2048 positions as transformers builds it: a bfloat16 slope times the
    positions, which the multiply rounds to bfloat16 (257 is 256) before it rounds the product, then scaled
    by 1 / sqrt(head size); beyond the 64 positions the cached test steps through."""
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    hf, tokenizer = tiny_falcon_alibi()
    attention = from_hf("falcon-rw", hf, tokenizer)._lm.model.layers[0].self_attn
    heads, head_dim = hf.config.num_attention_heads, hf.config.hidden_size // hf.config.num_attention_heads
    theirs = build_alibi_tensor(torch.ones(1, 2048, dtype=torch.long), heads, torch.float32) / head_dim**0.5
    np.testing.assert_allclose(attention._alibi(2048, torch.float32).numpy(), theirs.numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch", ["bloom", "bloom_norm_residual", slow("falcon_alibi"), slow("mpt"), "stablelm_qk_norm", slow("cohere_qk_norm"),
                                  slow("phi_qk_norm"), slow("persimmon")])
def test_alibi_and_qk_layer_norm_decoders_decode_with_a_cache_as_transformers_computes(llama_like, arch):
    """BLOOM (also with its norms' outputs as the residuals), Falcon-RW and MPT (ALiBi: each head's slope times the key's position added to its scores, the
    past's keys included; Falcon's rounded to bfloat16, MPT's relative to the last key), and StableLM, Cohere
    and Phi-2 with LayerNorms of their query and key heads (StableLM's and Cohere's a weight for each head,
    Phi-2's and Persimmon's one for all, with a bias) compile to a decoder with a KV cache whose stepped logits are
    transformers' full sequence's over 64 positions. The ALiBi models' attention is fused, the bias the
    kernel's `attention_bias`; the others' stays as exported (the kernel takes no such norm). BLOOM's layout
    has the default positions of a config without a limit."""
    out = _llama_like_artifact(llama_like, arch)
    nodes = _nodes(out)
    alibi = arch in ("bloom", "bloom_norm_residual", "falcon_alibi", "mpt")
    attention = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2 * alibi and all(len(n.input) == 11 and n.input[10] for n in attention)
    assert sum(n.op_type == "Softmax" for n in nodes) == 2 * (not alibi)
    layout = read_layout(out)
    assert (layout.model_type, layout.max_positions) == ("llama", ALIBI_POSITIONS if arch.startswith("bloom") else MAX_POSITIONS)
    hf, _ = globals()[f"tiny_{arch}"]()
    ids = np.random.default_rng(1).integers(3, VOCAB, MAX_POSITIONS)
    with torch.no_grad():
        full = hf(torch.from_numpy(ids[None])).logits[0].numpy()
    stepped = cached_logits(CachedSession(out / "model.onnx", layout, threads=1), ids, prefill=7)
    np.testing.assert_allclose(stepped, full, atol=5e-5 * np.abs(full).max())


@pytest.mark.parametrize("arch", ["olmo_clip", slow("olmoe_clip"), slow("mpt_clip")])
def test_clipped_qkv_decoders_decode_with_a_cache_as_transformers_computes(llama_like, arch):
    """OLMo, OLMoE and MPT with `clip_qkv`: Q, K and V clamped (OLMoE's after the norms of its query and
    key projections) by one Clip each a layer (MPT's fused Q, K and V split at load), the stepped logits
    transformers' full sequence's; the clamp bites (the logits are not those of the unclipped model)."""
    out = _llama_like_artifact(llama_like, arch)
    clips = [n for n in _nodes(out) if n.op_type == "Clip"]
    assert len(clips) == 2 * 3
    layout = read_layout(out)
    hf, _ = globals()[f"tiny_{arch}"]()
    unclipped, _ = globals()[f"tiny_{arch.removesuffix('_clip')}"]()
    ids = np.random.default_rng(1).integers(3, VOCAB, MAX_POSITIONS)
    with torch.no_grad():
        full = hf(torch.from_numpy(ids[None])).logits[0].numpy()
        plain = unclipped(torch.from_numpy(ids[None])).logits[0].numpy()
    assert np.abs(full - plain).max() > 0.01 * np.abs(full).max()
    stepped = cached_logits(CachedSession(out / "model.onnx", layout, threads=1), ids, prefill=7)
    np.testing.assert_allclose(stepped, full, atol=5e-5 * np.abs(full).max())


def test_longrope_steps_switch_to_the_long_factors_where_transformers_does(llama_like):
    """A `longrope` decoder (Phi-4-mini-like, trained on 32 of its 64 positions) stepped through its
    cache from a prefill of 7 to position 63: each step rotates by the short factors while its
    position is below 32 and by the long ones from 32 on, the keys in the cache staying as they were
    rotated, as transformers' own cache does; the two sets differ enough to tell them apart."""
    out = _llama_like_artifact(llama_like, "phi4")
    hf, _ = tiny_phi4()
    ids = torch.from_numpy(np.random.default_rng(2).integers(3, VOCAB, MAX_POSITIONS)[None])
    # transformers 5.x renames `past_key_values` to `cache`
    cache = {("cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"):
             transformers.DynamicCache(config=hf.config), "use_cache": True}
    with torch.no_grad():
        rows = [hf(ids[:, :7], **cache).logits[0]]
        rows += [hf(ids[:, t: t + 1], **cache).logits[0] for t in range(7, MAX_POSITIONS)]
        theirs = torch.cat(rows).numpy()
        full = hf(ids).logits[0].numpy()  # every position rotated by the long factors
    ours = cached_logits(CachedSession(out / "model.onnx", read_layout(out), threads=1), ids[0].numpy(), prefill=7)
    tolerance = 5e-5 * np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, atol=tolerance)
    assert np.abs(ours[:32] - full[:32]).max() > 10 * tolerance


@pytest.mark.parametrize("arch", ["ernie4_5", "mixtral", "gpt2", slow("bloom")])
def test_int4_rounds_decoders_through_their_slices_and_routing(llama_like, calib_file, arch):
    """`int4`'s `gptq` runs the blocks of a decoder whose rotation slices each pair's values with a step
    (ERNIE 4.5's `x[..., 1::2]`), of a mixture of experts (Mixtral's TopK and ScatterElements) and of an
    ALiBi decoder (BLOOM's slopes times a Range of key positions), and calibrates a decoder with a table of
    positions (GPT-2's 64, fewer than the 128 tokens of a calibration window); the logits stay close to the
    float model's."""
    out = qcompile(f"llama_like_factory:tiny_{arch}", llama_like / f"{arch}-int4", pipeline="int4", calibration=str(calib_file),
                   drift=False).output
    hf, _ = globals()[f"tiny_{arch}"]()
    ids = np.random.default_rng(5).integers(3, VOCAB, 16)
    with torch.no_grad():
        full = hf(torch.from_numpy(ids[None])).logits[0].numpy()
    got = cached_logits(CachedSession(out / "model.onnx", read_layout(out), 1), ids, prefill=8)
    assert execute.drift({"y": full}, {"y": got})["cosine"] > 0.99


def test_qwen2_int4_packs_its_biased_qkv(llama_like, calib_file):
    """`int4` on Qwen2: Q, K and V one MatMulNBits, their biases one Add, read packed by the attention;
    the logits stay close to the float model's."""
    out = qcompile("llama_like_factory:tiny_qwen2", llama_like / "qwen2-int4", pipeline="int4", calibration=str(calib_file),
                   drift=False).output
    nodes = _nodes(out)
    producers = {o: n for n in nodes for o in n.output}
    attention = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert [producers[producers[n.input[0]].input[0]].op_type for n in attention] == ["MatMulNBits"] * 2
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == 9 and sum(n.op_type == "Add" for n in nodes) == 4
    hf, _ = tiny_qwen2()
    ids = np.random.default_rng(5).integers(3, VOCAB, 16)
    with torch.no_grad():
        full = hf(torch.from_numpy(ids[None])).logits[0].numpy()
    got = cached_logits(CachedSession(out / "model.onnx", read_layout(out), 1), ids, prefill=8)
    assert execute.drift({"y": full}, {"y": got})["cosine"] > 0.99


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "phi3", "llama3", "phi4", "qwen2_yarn", "gemma", "gemma2", "gemma3",
                                  "granite", "smollm3", "olmo2", "ministral", "seed_oss", "olmo3", "exaone4", "ernie4_5",
                                  "helium", "stablelm", "starcoder2", "phi", "gpt_neox", "gptj", "gpt2", "gpt_bigcode", "opt",
                                  "cohere", "arcee", "nemotron", "cohere2", "glm", "glm4", "falcon", "falcon_new",
                                  "falcon_sequential", "olmo", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "apertus",
                                  "hunyuan", "bloom", "gpt_neo", "mpt", "codegen", "falcon_alibi", "stablelm_qk_norm",
                                  "cohere_qk_norm", "phi_qk_norm", "persimmon"])
def test_llama_like_artifacts_generate_in_onnxruntime_genai(llama_like, arch):
    """ONNX Runtime GenAI loads each architecture's artifact by its `genai_config.json` (`type` qwen2,
    qwen3, mistral, phi3, llama) and generates our greedy tokens."""
    pytest.importorskip("onnxruntime_genai")
    out = _llama_like_artifact(llama_like, arch)
    ours = generate(out, PROMPT, max_new_tokens=10, threads=1)["tokens"]
    assert _genai_greedy(out, PROMPT, 10)[: len(ours)] == ours


def _with_rope_type(model: torch.nn.Module, rope_type: str) -> torch.nn.Module:
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_type": rope_type}
    return model


@pytest.mark.parametrize("build, message", [
    (lambda: transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1)),
     "takes llama, mistral, ministral, phi3, qwen2, qwen3, seed_oss, gemma, gemma2, gemma3_text, granite, smollm3, olmo2, "
     "olmo3, exaone4, ernie4_5, helium, stablelm, starcoder2, phi, gpt_neox, gptj, gpt2, gpt_bigcode, opt, cohere, cohere2, "
     "arcee, nemotron, glm, glm4, falcon, olmo, mixtral, qwen2_moe, qwen3_moe, olmoe, apertus, hunyuan_v1_dense, bloom, gpt_neo, mpt, codegen, persimmon causal LMs"),
    (lambda: transformers.MptForCausalLM(transformers.MptConfig(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=1,
                                                                attn_config={"qk_ln": True})),
     "MPT models with ALiBi of alibi_bias_max 8, no query and key LayerNorms"),
    (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=2,
                                                                  scale_attn_by_inverse_layer_idx=True)),
     "attention scaled by 1 / sqrt\\(head size\\) in every layer"),
    (lambda: _with_rope_type(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)), "mrope"),
     "rotary embeddings of type default, linear, llama3, yarn, dynamic, longrope, got 'mrope'"),
    (lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
        use_bidirectional_attention=True)),
     "takes causal attention"),
    (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                                    num_hidden_layers=1, num_attention_heads=4, hidden_act="tanh")),
     "MLP activations silu, gelu_pytorch_tanh, gelu_new, gelu, relu, relu2, xielu, got 'tanh'"),
    (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                                    num_hidden_layers=1, num_attention_heads=4, hidden_act="xielu")),
     "xielu in MLPs without a gate only"),
])
def test_cache_capture_refuses_what_our_decoder_does_not_compute(build, message):
    with pytest.raises(UserError, match=message):
        from_hf("lm", build(), tiny_tokenizer())


@pytest.mark.slow
def test_tiny_mixed_compiles_the_cache_graph(factory, calib_file, tmp_path):
    out = qcompile(factory, tmp_path / "mixed", pipeline="mixed{avg-bits=4.25}", calibration=str(calib_file), drift=False).output
    assert "MatMulNBits" in (out / "model.onnx").read_bytes().decode("latin-1")
    assert generate(out, PROMPT, max_new_tokens=4, threads=1)["new_tokens"] >= 1


def _assert_each_initializer_counted_once(artifact: Path, layers: dict) -> None:
    """The manifest's bytes at rest of the mixed layers (a merged one's initializers are named after
    it or after the layers it computes) add up to the bytes of the initializers they name, once each."""
    import onnx

    sizes = {t.name: onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(artifact / "model.onnx")).graph.initializer}
    prefixes = tuple(f"{name}." for layer, e in layers.items() for name in (layer, *e.get("layers", ())))
    assert sum(e["bytes_at_rest"] for e in layers.values()) == sum(b for n, b in sizes.items() if n.startswith(prefixes))


def test_mixed_decoder_allocates_the_linears_of_one_input_together(factory, calib_file, float_lm, tmp_path):
    """In a decoder with a KV cache the mixed preset allocates Q/K/V and gate/up together
    (`allocate-bits{shared-input=auto}`): each class of them is one MatMulNBits, Q/K/V packed into
    the attention, fewer kernels than allocated apart; the manifest names the linears each merged
    layer computes, and the cached logits are as close to float's as allocated apart (4.25 bits on
    this random 128-wide model: cosine 0.93 joint, 0.90 apart)."""
    outs = {mode: qcompile(factory, tmp_path / mode, pipeline=f"mixed{{avg-bits=4.25 shared-input={mode}}}",
                           calibration=str(calib_file), drift=False).output for mode in ("auto", "apart")}
    kernels = {mode: _op_types(out).count("MatMulNBits") for mode, out in outs.items()}
    assert 0 < kernels["auto"] < kernels["apart"]
    attention = [n for n in _nodes(outs["auto"]) if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2 and all(n.input[1] == "" and n.input[2] == "" for n in attention)  # packed QKV
    layers = json.loads((outs["auto"] / "manifest.json").read_text())["mixed_layers"]
    merged = sorted(len(entry["layers"]) for entry in layers.values() if "layers" in entry)
    assert merged == [2, 2, 3, 3]  # per layer: Q/K/V and gate/up
    _assert_each_initializer_counted_once(outs["auto"], layers)
    assert all("fp16(float MatMul, cast at load)" in e["route"] for e in layers.values() if "fp16" in e["route"])
    ids = np.random.default_rng(6).integers(3, VOCAB, 16)
    want = cached_logits(CachedSession(float_lm / "model.onnx", read_layout(float_lm), 1), ids, prefill=8)
    cosine = {mode: execute.drift({"y": want}, {"y": cached_logits(CachedSession(out / "model.onnx", read_layout(out), 1), ids,
                                                                   prefill=8)})["cosine"] for mode, out in outs.items()}
    assert cosine["auto"] > 0.9 and cosine["auto"] > cosine["apart"] - 0.02


@pytest.mark.slow
def test_smollm2_cache_graph_equals_the_full_graph(tmp_path):
    from qcompiler.driver.capture import resolve
    from qcompiler.tools.evaluate import evaluate

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-valid-excerpt.txt"
    if not data.is_file():
        pytest.skip(f"{data} is not there")
    out = qcompile("smollm2-135m-kv", tmp_path / "lm", drift=False).output
    full, _ = resolve("smollm2-135m")
    from qcompiler import ir as qir
    from qcompiler.analysis.execute import ort_session
    import onnx

    onnx.save(qir.to_proto(full), str(tmp_path / "full.onnx"))
    from qcompiler.models import smollm2

    ids = smollm2.windows(data.read_text(), 48)[0]
    expected = ort_session(str(tmp_path / "full.onnx"), 2).run(None, {"input_ids": ids[None]})[0][0]
    got = cached_logits(CachedSession(out / "model.onnx", read_layout(out), 2), ids, prefill=40)
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=0)
    result = evaluate(out, "perplexity", data, count=2, window=64, threads=2)
    assert abs(result["perplexity_compiled"] / result["perplexity_float"] - 1) < 1e-4


def test_block_interpreter_runs_the_cache_graph(float_lm):
    """Block-wise passes (gptq, flexround, tune-scales) evaluate the graph in torch: the cache
    graph's mask ops included, it gives ONNX Runtime's logits and presents on a decode step."""
    import qcompiler
    from qcompiler.analysis.torch_exec import Constants, run_nodes

    model = qcompiler.load(float_lm / "model.onnx")
    layout = read_layout(float_lm)
    session = CachedSession(float_lm / "model.onnx", layout, 1)
    session.step(np.arange(3, 9))
    feeds = {"input_ids": np.array([[11, 12]]), "attention_mask": np.ones((1, 8), np.int64),
             "position_ids": np.array([[6, 7]]), **{k: v.numpy() for k, v in session.past.items()}}
    expected = session.session.run(None, feeds)
    env = run_nodes(list(model.graph), {k: torch.from_numpy(v) for k, v in feeds.items()},
                    lambda node: Constants().get(node.inputs[1]), Constants())
    for value, want in zip(model.graph.outputs, expected):
        np.testing.assert_allclose(env[value.name].numpy(), want, atol=1e-4)


# ---------------------------------------------------------------- int8 KV cache (kv-cache{dtype=int8})


@pytest.fixture(scope="module")
def int8_lm(factory, tmp_path_factory):
    return qcompile(factory, tmp_path_factory.mktemp("lm") / "int8", pipeline="kv-cache{dtype=int8}", drift=False).output


def test_int8_cache_graph_layout_and_files(int8_lm):
    import onnx

    graph = onnx.load(str(int8_lm / "model.onnx"), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    layout = read_layout(int8_lm)
    assert layout.kv_cache == "int8" and [i.name for i in graph.input] == layout.input_names
    assert [o.name for o in graph.output] == layout.output_names
    assert layout.input_names[-1] == "past_key_values.1.value_scale" and layout.output_names[-1] == "present.1.value_scale"
    assert types["past_key_values.0.key"] == types["present.1.value"] == onnx.TensorProto.INT8
    assert types["past_key_values.0.key_scale"] == types["present.0.key_scale"] == onnx.TensorProto.FLOAT
    assert json.loads((int8_lm / "manifest.json").read_text())["causal_lm"]["kv_cache"] == "int8"
    assert not (int8_lm / "genai_config.json").exists() and (int8_lm / "tokenizer.json").is_file()
    assert layout.cache_bytes_per_token() == 2 * 2 * 2 * (32 + 4)  # layers x (K, V) x kv heads x (codes + scale)


def test_float_cache_manifest_has_no_kv_cache_key(float_lm):
    assert "kv_cache" not in json.loads((float_lm / "manifest.json").read_text())["causal_lm"]


def test_int8_cache_presents_are_the_rounded_float_presents(float_lm, int8_lm):
    """After a prefill (computed as in float), each present is the float present's codes and
    per-token-per-head scales (qcompiler/dialect/kv_int8.py): wrong scales or codes fail here."""
    from qcompiler.dialect import kv_int8

    ids = np.random.default_rng(5).integers(3, VOCAB, 10)
    floats, int8 = CachedSession(float_lm / "model.onnx", read_layout(float_lm), 1), CachedSession(int8_lm / "model.onnx", read_layout(int8_lm), 1)
    np.testing.assert_allclose(int8.step(ids), floats.step(ids), atol=1e-5)
    for name, present in floats.past.items():
        codes, scale = kv_int8.quantize(present.numpy())
        assert int8.past[name].numpy().dtype == np.int8 and int8.past[name].numpy().shape == codes.shape
        assert np.abs(int8.past[name].numpy().astype(int) - codes).max() <= 1  # a tie may round the other way
        np.testing.assert_allclose(int8.past[name + "_scale"].numpy(), scale, rtol=1e-6)
        assert np.abs(kv_int8.dequantize(int8.past[name].numpy(), int8.past[name + "_scale"].numpy()) - present.numpy()).max() <= scale.max() / 2 * 1.001


def test_int8_cache_logits_stay_close_over_decode_steps(float_lm, int8_lm):
    """16 single-token steps after a prefill of 8: the int8 cache's logits stay within 0.01 of
    the float cache's (they differ by about 0.003 on logits up to 0.9; scales off by 10% give
    about 0.04) with the same greedy token at every step."""
    from onnxruntime import OrtValue

    ids = np.random.default_rng(5).integers(3, VOCAB, 24)
    reference = cached_logits(CachedSession(float_lm / "model.onnx", read_layout(float_lm), 1), ids, prefill=8)
    session = CachedSession(int8_lm / "model.onnx", read_layout(int8_lm), 1)
    got = cached_logits(session, ids, prefill=8)
    np.testing.assert_allclose(got[:8], reference[:8], atol=1e-5)
    assert np.abs(got[8:] - reference[8:]).max() < 0.01
    assert (got.argmax(-1) == reference.argmax(-1)).all()
    session.reset()  # the same steps with every cached scale 10% too large are told apart
    session.step(ids[:8])
    session.past = {k: OrtValue.ortvalue_from_numpy(v.numpy() * np.float32(1.1)) if k.endswith("_scale") else v for k, v in session.past.items()}
    skewed = np.concatenate([session.step(ids[t : t + 1]) for t in range(8, 24)])
    assert np.abs(skewed - reference[8:]).max() > 0.01


def test_generate_runs_the_int8_cache(float_lm, int8_lm, capsys):
    result = generate(int8_lm, PROMPT, max_new_tokens=10, threads=1)
    assert result["new_tokens"] == 10 and result["decode_tokens_per_s"] > 0
    assert result["tokens"] == generate(float_lm, PROMPT, max_new_tokens=10, threads=1)["tokens"]
    assert main(["generate", str(int8_lm), "--prompt", PROMPT, "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 4


def test_kv_cache_option_and_its_order():
    from qcompiler.pipeline.spec import check_order, format_pipeline, parse_pipeline

    assert "kv-cache" not in format_pipeline(parse_pipeline("w8a8{act-mode=per-token}"))
    names = [p.name for p in parse_pipeline("w8a8{act-mode=per-token kv-cache=int8}")]
    assert names[-2:] == ["kv-cache", "lower-ort"] and [p.name for p in parse_pipeline("mixed{kv-cache=int8}")][-2:] == names[-2:]
    assert [p.name for p in parse_pipeline("default{kv-cache=int8}")] == ["canonicalize", "kv-cache"]
    with pytest.raises(UserError, match="calibrate cannot come after kv-cache"):
        check_order(parse_pipeline("kv-cache,calibrate"))
    with pytest.raises(UserError, match="gptq cannot come after kv-cache"):
        check_order(parse_pipeline("kv-cache,lower-ort,gptq"))
    with pytest.raises(UserError, match="calibrate cannot come after kv-cache"):
        check_order(parse_pipeline("calibrate"), frozenset({"kv-cache-format"}))


def test_kv_cache_refuses_a_model_without_a_cache():
    from qcompiler.ir import parse
    from qcompiler.tools.opt import optimize

    model = parse('<ir_version: 10, opset_import: ["" : 21]>\ng (float[2] x) => (float[2] y)\n{\n  y = Relu (x)\n}\n')
    with pytest.raises(UserError, match="no past_key_values"):
        optimize(model, "kv-cache")


@pytest.mark.slow
def test_tiny_w8a8_with_int8_cache(factory, calib_file, float_lm, tmp_path):
    out = qcompile(factory, tmp_path / "w8kv", pipeline="w8a8{act-mode=per-token kv-cache=int8}", calibration=str(calib_file),
                   drift=False).output
    assert read_layout(out).kv_cache == "int8"
    ids = np.random.default_rng(4).integers(3, VOCAB, 16)
    quantized = cached_logits(CachedSession(out / "model.onnx", read_layout(out), 1), ids, prefill=8)
    reference = cached_logits(CachedSession(float_lm / "model.onnx", read_layout(float_lm), 1), ids, prefill=8)
    assert np.sum(quantized * reference) / np.linalg.norm(quantized) / np.linalg.norm(reference) > 0.99


def test_generate_refuses_a_manifest_that_misnames_the_cache(int8_lm, tmp_path, capsys):
    copy = tmp_path / "misnamed"
    shutil.copytree(int8_lm, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["causal_lm"]["kv_cache"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["generate", str(copy), "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err.strip()
    assert "manifest says float32" in err and len(err.splitlines()) == 1


def test_float16_model_decodes_with_a_float16_cache(factory, float_lm, tmp_path):
    out = qcompile(factory, tmp_path / "f16", dtype="float16", drift=False).output
    layout = read_layout(out)
    session = CachedSession(out / "model.onnx", layout, 1)
    assert session.cache_dtype == np.float16  # half the cache's memory
    ids = np.random.default_rng(6).integers(3, VOCAB, 12)
    half = cached_logits(session, ids, prefill=6)
    reference = cached_logits(CachedSession(float_lm / "model.onnx", read_layout(float_lm), 1), ids, prefill=6)
    assert np.abs(half.astype(np.float32) - reference).max() < 0.05
    assert len(generate(out, PROMPT, max_new_tokens=4, threads=1)["tokens"]) >= 1
