"""Running a compiled causal LM with its KV cache: `qcompiler generate` and cached perplexity.

`CachedSession` holds one ONNX Runtime session over the artifact's decoder graph and the cache
between steps: each step's `present.*` outputs (ONNX Runtime values, never copied to numpy) are
the next step's `past_key_values.*` inputs (with an int8 cache, `kv-cache{dtype=int8}`, the
`*_scale` tensors beside them pass along the same way: the layout names them), or, where the
attention is ONNX Runtime's GroupQueryAttention (the layout's `shared_buffer`), one buffer per
cache tensor is bound as both, which the kernel writes in place; the attention mask grows by the step's tokens and the
positions continue from the past's length. `generate` tokenizes the prompt with the artifact's
tokenizer, runs one prefill step over it, then one step per new token (greedy, or sampled at a
temperature with a seeded generator), stops at an end-of-sequence token or after
`max_new_tokens`, hands the text to a callback as it grows, and times prefill and decode.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler.codegen.lm_artifact import read_layout, read_tokenizer
from qcompiler.errors import UserError

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 4096
DEFAULT_NEW_TOKENS = 64  # or what the model's positions leave room for, when fewer


class CachedSession:
    """One sequence (batch 1) through a decoder graph with a KV cache."""

    def __init__(self, model_path: Path, layout, threads: int | None = None):
        from qcompiler.analysis.execute import ort_session

        self.layout = layout
        self.session = ort_session(str(model_path), threads)
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = sorted(set(layout.output_names) - set(self.output_names))
        if missing:
            raise UserError(f"'{model_path}' lacks the outputs {missing[:2]} of a decoder with a KV cache; compile the model again")
        cache_types = {i.type for i in self.session.get_inputs() if i.name in layout.input_names[3:] and not i.name.endswith("_scale")}
        # a float cache is in the model's float type: float32, or float16 for a float16 model
        expected = {"tensor(int8)": np.int8} if layout.kv_cache == "int8" else {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        if len(cache_types) != 1 or not cache_types <= set(expected):
            raise UserError(f"'{model_path}' takes a {sorted(cache_types)[0] if cache_types else 'missing'} cache where its manifest "
                            f"says {layout.kv_cache}; compile the model again")
        self.cache_dtype = expected[next(iter(cache_types))]
        logits_type = next(o.type for o in self.session.get_outputs() if o.name == "logits")
        self.logits_dtype = np.float16 if logits_type == "tensor(float16)" else np.float32
        self.reset()

    def reset(self, capacity: int = 0) -> None:
        """Forget the sequence: an empty past. Where the layout allows a shared buffer, the cache is
        one buffer per tensor of `capacity` positions (grown by doubling when a step needs more),
        bound as both the past input and the present output: the attention writes each step's
        keys and values into it in place, and the runner copies nothing between steps."""
        from onnxruntime import OrtValue

        self.length = 0
        if self.layout.shared_buffer:
            self._bind_cache(self._buffers(max(capacity, 1)))
            return
        self.past = {name: OrtValue.ortvalue_from_numpy(array if name.endswith("_scale") else array.astype(self.cache_dtype))
                     for name, array in self.layout.empty_past(1).items()}  # an int8 cache's scales stay float32

    def _buffers(self, capacity: int, keep: dict | None = None) -> dict:
        """Zeroed cache buffers [1, kv heads, capacity, head dim], with `keep`'s first `self.length`
        positions copied in."""
        from onnxruntime import OrtValue

        shape = (1, self.layout.num_kv_heads, capacity, self.layout.head_dim)
        buffers = {}
        for name in self.layout.input_names[3:]:
            array = np.zeros(shape, self.cache_dtype)
            if keep is not None:
                array[:, :, : self.length] = keep[name].numpy()[:, :, : self.length]
            buffers[name] = OrtValue.ortvalue_from_numpy(array)
        return buffers

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Run `ids` [seq] after what came before; their logits [seq, vocab]."""
        from onnxruntime import OrtValue

        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        seq = ids.shape[1]
        feeds = {
            "input_ids": OrtValue.ortvalue_from_numpy(ids),
            "attention_mask": OrtValue.ortvalue_from_numpy(np.ones((1, self.length + seq), np.int64)),
            "position_ids": OrtValue.ortvalue_from_numpy(np.arange(self.length, self.length + seq, dtype=np.int64)[None]),
        }
        if self.layout.shared_buffer:
            return self._step_in_place(feeds, seq)
        feeds.update(self.past)
        outputs = dict(zip(self.output_names, self.session.run_with_ort_values(self.output_names, feeds)))
        self.past = {past: outputs[present] for past, present in zip(self.layout.input_names[3:], self.layout.output_names[1:])}
        self.length += seq
        return outputs["logits"].numpy()[0]

    def _bind_cache(self, buffers: dict) -> None:
        """Bind each cache buffer as both past and present, once: the binding is kept from step to
        step (binding the 2 x layers tensors anew each step measured about 7 % of a SmolLM2 int4
        decode step), and only the step's own inputs and its logits are bound per step."""
        self.past = buffers
        self._binding = self.session.io_binding()
        for past, present in zip(self.layout.input_names[3:], self.layout.output_names[1:]):
            self._binding.bind_ortvalue_input(past, buffers[past])
            self._binding.bind_ortvalue_output(present, buffers[past])
        self._logits: dict[int, tuple[np.ndarray, Any]] = {}  # steps' length -> the logits buffer and its OrtValue

    def _step_in_place(self, feeds: dict, seq: int) -> np.ndarray:
        """One step with each cache buffer bound as both past and present."""
        capacity = next(iter(self.past.values())).shape()[2]
        if self.length + seq > capacity:
            self._bind_cache(self._buffers(max(2 * capacity, self.length + seq), keep=self.past))
        for name, value in feeds.items():
            self._binding.bind_ortvalue_input(name, value)
        if seq not in self._logits:  # the first step of this length: a buffer for its logits
            from onnxruntime import OrtValue

            logits = np.empty((1, seq, self.layout.vocab_size), self.logits_dtype)
            self._logits[seq] = logits, OrtValue.ortvalue_from_numpy(logits)
        logits, value = self._logits[seq]
        self._binding.bind_ortvalue_output("logits", value)
        self.session.run_with_iobinding(self._binding)
        self.length += seq
        return logits[0].copy()


def choose(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """The next token: the most likely one at temperature 0, else a draw from softmax(logits / T)."""
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def check_request(prompt_tokens: int, max_new_tokens: int, temperature: float, layout) -> None:
    """One-line UserErrors for a request the model cannot serve."""
    if prompt_tokens == 0:
        raise UserError("the prompt is empty (no tokens); give some text with --prompt")
    if prompt_tokens >= layout.max_positions:
        raise UserError(
            f"the prompt has {prompt_tokens} tokens, more than the model's {layout.max_positions} positions leave room for; shorten it"
        )
    room = min(MAX_NEW_TOKENS, layout.max_positions - prompt_tokens)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or not 1 <= max_new_tokens <= room:
        raise UserError(f"--max-new-tokens must be between 1 and {room} for this prompt (the model has {layout.max_positions} positions), got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or a positive number, got {temperature}")


def generate(
    artifact: str | Path,
    prompt: str,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    threads: int | None = None,
    on_text: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Continue `prompt` with the artifact's causal LM; `on_text` receives each new piece of text
    as soon as it decodes; `max_new_tokens` None: 64, or fewer where the positions end. Returns the text, the token ids and the timings."""
    artifact = Path(artifact)
    layout = read_layout(artifact)
    tokenizer = read_tokenizer(artifact)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if max_new_tokens is None:
        max_new_tokens = max(1, min(DEFAULT_NEW_TOKENS, layout.max_positions - len(prompt_ids)))
    check_request(len(prompt_ids), max_new_tokens, temperature, layout)
    session = CachedSession(artifact / "model.onnx", layout, threads)
    session.reset(capacity=len(prompt_ids) + max_new_tokens)
    rng = np.random.default_rng(seed)
    eos = set(layout.eos_token_ids)

    start = time.perf_counter()
    token = choose(session.step(np.asarray(prompt_ids))[-1], temperature, rng)
    prefill_s = time.perf_counter() - start
    tokens, shown = [token], ""
    stopped = "eos" if token in eos else "length"
    start = time.perf_counter()
    while token not in eos and len(tokens) < max_new_tokens:
        shown = _emit(tokenizer, tokens, shown, on_text)
        token = choose(session.step(np.asarray([token]))[-1], temperature, rng)
        tokens.append(token)
        if token in eos:
            stopped = "eos"
    decode_s = time.perf_counter() - start
    _emit(tokenizer, [t for t in tokens if t not in eos], shown, on_text, final=True)
    decode_steps = len(tokens) - 1
    return {
        "prompt_tokens": len(prompt_ids),
        "new_tokens": len(tokens),
        "tokens": tokens,
        "text": tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=False),
        "stopped": stopped,
        "prefill_s": round(prefill_s, 4),
        "decode_s": round(decode_s, 4),
        "prefill_tokens_per_s": round(len(prompt_ids) / prefill_s, 2) if prefill_s > 0 else None,
        "decode_tokens_per_s": round(decode_steps / decode_s, 2) if decode_steps and decode_s > 0 else None,
    }


def _emit(tokenizer, tokens: list[int], shown: str, on_text, final: bool = False) -> str:
    """Hand `on_text` the text decoded beyond `shown`; an incomplete UTF-8 character at the end
    waits for the next token unless this is the last call."""
    if on_text is None:
        return shown
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    if (text.endswith("\ufffd") and not final) or not text.startswith(shown):
        return shown
    if len(text) > len(shown):
        on_text(text[len(shown):])
    return text


def cached_logits(session: CachedSession, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits [len, vocab] of a token row run through the cache: a prefill of `prefill` tokens,
    then one token per step."""
    session.reset(capacity=len(ids))
    rows = [session.step(ids[:prefill])]
    rows += [session.step(ids[t : t + 1]) for t in range(prefill, len(ids))]
    return np.concatenate(rows)
