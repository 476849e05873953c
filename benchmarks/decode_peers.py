"""Peer runtimes for benchmarks/decode.py: ONNX Runtime GenAI's model builder and llama.cpp.

Each peer is made from the same weights as our artifacts (the bundled SmolLM2-135M-Instruct GGUF,
whose matrices passed through Q4_1 once) and is run through the same interface as
`qcompiler.tools.decode.CachedSession` (`reset(capacity)`, `step(ids)` -> logits [rows, vocab]), so decode.py
times it in the same interleaved rounds, scores its perplexity on the same held-out windows with
the same protocol (`qcompiler.tools.decode.cached_logits`: a prefill of half the window, then one token
per step) and feeds it the same token ids (no BOS, nothing re-tokenized).

- `genai int4`, `genai fp32`: a Hugging Face folder written from the GGUF's float32 weights
  (`LlamaForCausalLM.save_pretrained` with the embedding tied to the head, as released, and the
  tokenizer's `save_pretrained`), built by `python -m onnxruntime_genai.models.builder -i HF -o DIR
  -p int4|fp32 -e cpu` with the builder's defaults (int4: symmetric RTN blocks of 32 in
  `MatMulNBits`, accuracy level 4 = int8 compute on CPU; GroupQueryAttention in both), and run by
  ONNX Runtime GenAI itself (`og.Generator`: `append_tokens` runs a step, `get_output("logits")`
  reads its logits), its `genai_config.json` set to `--threads` intra-op threads.
- `llama.cpp Q4_1`, `llama.cpp Q4_K`, `llama.cpp Q3_K`: the bundled GGUF as shipped, and requantized
  from it by `llama_model_quantize` (`allow_requantize`) to `Q4_K_M` and `Q3_K_M` (the mixes
  llama.cpp's `quantize` tool calls Q4_K and Q3_K; SmolLM2's 576-wide rows are no multiple of 256,
  so llama.cpp falls back to Q5_0/Q8_0 blocks of 32 for those); run by llama-cpp-python
  (`Llama.eval`, `--threads` threads for prefill and decode). The timing instance keeps only the
  last row's logits, as llama.cpp does when generating; the perplexity instance keeps every row
  (`logits_all`).

Install the peers into an environment of their own (the project's stays as it is):

    cp -al .venv .venv-peers            # a hard-linked copy (pip replaces files, never edits them)
    .venv-peers/bin/python -m pip install -c <(echo torch==2.13.0) onnxruntime-genai llama-cpp-python
    .venv-peers/bin/python benchmarks/decode.py --peers genai,llamacpp ...

llama-cpp-python compiles llama.cpp from source where no wheel fits (20+ minutes on 2 cores;
`CMAKE_ARGS="-DGGML_NATIVE=ON"` builds for the machine's own instructions). A peer whose package
is absent is left out with one line saying so.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

FAMILIES = {"genai": ("onnxruntime_genai", "onnxruntime-genai"), "llamacpp": ("llama_cpp", "llama-cpp-python")}  # module, package
GENAI_PRECISIONS = ("int4", "fp32")
LLAMA_TYPES = {"Q4_1": None, "Q4_K": "Q4_K_M", "Q3_K": "Q3_K_M"}  # row -> llama_model_quantize ftype (None: as shipped)


def available(families: list[str]) -> tuple[list[str], list[str]]:
    """The families whose package imports here, and a line for each one that does not."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown peer families {unknown}; choose from {list(FAMILIES)}")
    present, lines = [], []
    for family in families:
        module, package = FAMILIES[family]
        if importlib.util.find_spec(module) is None:
            lines.append(f"peer '{family}' skipped: the package '{package}' is not installed "
                         f"(see benchmarks/decode_peers.py for the install command)")
        else:
            present.append(family)
    return present, lines


def folder_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


# --------------------------------------------------------------------------------------------
# ONNX Runtime GenAI


def write_hf_folder(folder: Path) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) of the bundled SmolLM2's float32
    weights, the embedding tied to the LM head as the model was released."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qcompiler.models import smollm2

    if (folder / "config.json").is_file():
        return folder
    cfg, state = smollm2.read_gguf(smollm2.gguf_path())
    tok = smollm2.tokenizer()
    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.eps, max_position_embeddings=cfg.max_positions,
                         rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         torch_dtype="float32")
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_genai(hf: Path, out: Path, precision: str, threads: int) -> dict[str, Any]:
    """Run ONNX Runtime GenAI's model builder for CPU at `precision`; its genai_config.json set to
    `threads` intra-op threads. Reuses a folder built before."""
    start = time.perf_counter()
    if not (out / "genai_config.json").is_file():
        log = out.parent / f"{out.name}.build.log"
        with log.open("w") as handle:
            code = subprocess.call([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                                    "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache")],
                                   stdout=handle, stderr=subprocess.STDOUT)
        if code != 0:
            raise RuntimeError(f"the model builder failed ({code}); see {log}")
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    config_path.write_text(json.dumps(config, indent=4))
    return {"build_s": round(time.perf_counter() - start, 1), "file_bytes": folder_bytes(list(out.glob("model.onnx*"))),
            "config": f"onnxruntime_genai.models.builder -p {precision} -e cpu (defaults)"}


def ours_in_genai(artifact: Path, out: Path, threads: int) -> dict[str, Any]:
    """A copy of one of our artifacts (hard links, the folder ONNX Runtime GenAI loads as it is)
    whose genai_config.json sets `threads` intra-op threads, as the builder rows' do."""
    out.mkdir(parents=True, exist_ok=True)
    for path in artifact.iterdir():
        target = out / path.name
        if path.is_file() and path.name != "genai_config.json":
            target.unlink(missing_ok=True)  # a link to an earlier compile's file
            os.link(path, target)
    config = json.loads((artifact / "genai_config.json").read_text())
    config["model"]["decoder"].setdefault("session_options", {}).update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    (out / "genai_config.json").write_text(json.dumps(config, indent=4))
    return {"file_bytes": folder_bytes(list(out.glob("model.onnx*"))), "config": f"our artifact {artifact.name}, run by og.Generator"}


class GenaiSession:
    """One sequence through ONNX Runtime GenAI: each step appends tokens and reads their logits."""

    def __init__(self, folder: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))
        self.reset()

    def reset(self, capacity: int = 0) -> None:  # the sessions' protocol; the peer sizes its own cache
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.model_max_length(), do_sample=False)
        self.generator = self.og.Generator(self.model, params)

    def model_max_length(self) -> int:
        return 2048

    def step(self, ids: np.ndarray) -> np.ndarray:
        self.generator.append_tokens(np.asarray(ids, dtype=np.int32).reshape(1, -1))
        logits = self.generator.get_output("logits")
        return logits.reshape(-1, logits.shape[-1])


# --------------------------------------------------------------------------------------------
# llama.cpp


def llama_gguf(row: str, out: Path, threads: int) -> dict[str, Any]:
    """The GGUF of a llama.cpp row: the bundled file, or it requantized by llama_model_quantize."""
    import llama_cpp

    from qcompiler.models import smollm2

    source = smollm2.gguf_path()
    ftype = LLAMA_TYPES[row]
    if ftype is None:
        return {"path": source, "config": "the bundled Q4_1 GGUF as shipped (Q8_0 embedding)", "quantize_s": 0.0,
                "file_bytes": source.stat().st_size}
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"smollm2-{ftype}.gguf"
    start = time.perf_counter()
    if not target.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.allow_requantize = True
        params.nthread = threads
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
        if code != 0:
            target.unlink(missing_ok=True)
            raise RuntimeError(f"llama_model_quantize({ftype}) returned {code}")
    return {"path": target, "config": f"llama_model_quantize(ftype={ftype}, allow_requantize) from the Q4_1 GGUF",
            "quantize_s": round(time.perf_counter() - start, 1), "file_bytes": target.stat().st_size}


def gguf_types(path: Path) -> dict[str, int]:
    """How many 2-D tensors of each llama.cpp type the file holds."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        if len(tensor.shape) == 2:
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


class LlamaSession:
    """One sequence through llama.cpp; `all_logits` keeps every row's logits (for perplexity),
    else only the last row's (generation)."""

    def __init__(self, path: Path, threads: int, context: int, all_logits: bool):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.all_logits = all_logits
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context,
                                   n_threads=threads, n_threads_batch=threads, logits_all=all_logits, verbose=False)
        self.vocab = self.llm.n_vocab()

    def reset(self, capacity: int = 0) -> None:  # the sessions' protocol; the peer sizes its own cache
        self.llm.reset()

    def step(self, ids: np.ndarray) -> np.ndarray:
        before = self.llm.n_tokens
        self.llm.eval([int(t) for t in np.asarray(ids).reshape(-1)])
        if self.all_logits:
            return np.asarray(self.llm.scores[before : self.llm.n_tokens], dtype=np.float32)
        row = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.vocab,)).copy()[None]


# --------------------------------------------------------------------------------------------
# Every peer row


def make_peers(families: list[str], build: Path, threads: int, context: int) -> tuple[dict, dict, dict]:
    """Peer rows by name: a session for timing, a factory of a session for perplexity, and the row's
    facts (config, bytes, build time)."""
    timing, scoring, facts = {}, {}, {}
    if "genai" in families:
        hf = write_hf_folder(build / "hf-smollm2")
        for precision in GENAI_PRECISIONS:
            name = f"genai {precision}"
            folder = build / f"genai-{precision}"
            facts[name] = {"peer": "onnxruntime-genai", **build_genai(hf, folder, precision, threads)}
            timing[name] = GenaiSession(folder)
            scoring[name] = lambda s=timing[name]: s
            print(f"built {name} in {facts[name]['build_s']} s", flush=True)
    if "llamacpp" in families:
        for row in LLAMA_TYPES:
            name = f"llama.cpp {row}"
            made = llama_gguf(row, build / "gguf", threads)
            path = made.pop("path")
            facts[name] = {"peer": "llama-cpp-python", **made, "tensor_types": gguf_types(path)}
            timing[name] = LlamaSession(path, threads, context, all_logits=False)
            scoring[name] = lambda p=path: LlamaSession(p, threads, context, all_logits=True)
    return timing, scoring, facts


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for package in ("onnxruntime-genai", "llama-cpp-python"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found
