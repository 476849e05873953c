"""Causal LMs with a KV cache: the decode-step graph, its layout, and the data it calibrates on.

The graph takes `input_ids` [batch, seq], `attention_mask` [batch, past + seq] (1 for a token, 0
for padding), `position_ids` [batch, seq] and, per layer i, `past_key_values.{i}.key` and
`.value` [batch, kv_heads, past, head_dim] (keys already rotated); it returns `logits`
[batch, seq, vocab] and `present.{i}.key` / `.value` [batch, kv_heads, past + seq, head_dim], the
past with this step's keys and values appended. Batch, sequence and past length are dynamic; a
prefill step passes a past of length 0. This is the layout Optimum and ONNX Runtime GenAI use.

`CachedCausalLM` wraps the Llama decoder of `models/smollm2.py` (same modules, same weights) with
that signature; with a past of length 0 and positions 0..seq-1 it computes what the full-sequence
model computes. `CausalLMWithCache` is the bundled-model interface for any such decoder and its
tokenizer: calibration samples become a prefill step (empty past) followed by `DECODE_STEPS`
single-token steps whose past comes from the float model, so calibration sees both.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from qcompiler.errors import UserError
from qcompiler.models.base import MASK_VALUE, BundledModel

DECODE_STEPS = 4  # single-token steps after each calibration prefill
PROBE_PAST = 15  # the probe: a one-token step after a 15-token past (the windows are 16 tokens)


def past_names(layers: int) -> list[str]:
    """`past_key_values.{i}.key`, `past_key_values.{i}.value` for each layer, in graph order."""
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """`present.{i}.key`, `present.{i}.value` for each layer, in graph order."""
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """What a decoder with a KV cache needs to be driven: recorded in the artifact's manifest."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    kv_cache: str = "float32"  # or "int8": codes plus per-token-per-head scales (qcompiler/dialect/kv_int8.py)
    # the attention writes each step's keys and values into the past buffer (GroupQueryAttention), so a
    # runner may bind one buffer of the sequence's capacity as both past and present
    shared_buffer: bool = False

    @property
    def input_names(self) -> list[str]:
        """The graph's inputs: an int8 cache's scales follow the cache tensors."""
        past = past_names(self.num_layers)
        return ["input_ids", "attention_mask", "position_ids", *past, *self._scales(past)]

    @property
    def output_names(self) -> list[str]:
        """The graph's outputs, in the order of `input_names[3:]` after the logits."""
        present = present_names(self.num_layers)
        return ["logits", *present, *self._scales(present)]

    def _scales(self, names: list[str]) -> list[str]:
        return [name + "_scale" for name in names] if self.kv_cache == "int8" else []

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Past keys and values (and, for an int8 cache, their scales) of length 0, for a prefill step."""
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        dtype = np.int8 if self.kv_cache == "int8" else np.float32
        past = {name: np.zeros(shape, dtype) for name in past_names(self.num_layers)}
        scales = {name: np.zeros((*shape[:-1], 1), np.float32) for name in self._scales(list(past))}
        return {**past, **scales}

    def cache_bytes_per_token(self) -> int:
        """Bytes the cache holds per token of a sequence (keys and values of every layer, scales included)."""
        per_head = self.head_dim + 4 if self.kv_cache == "int8" else 4 * self.head_dim
        return 2 * self.num_layers * self.num_kv_heads * per_head

    def to_json(self) -> dict[str, Any]:
        """The manifest's `causal_lm` section; `kv_cache` only when not float32 and `shared_buffer`
        only when true (so other artifacts read as before)."""
        body = dataclasses.asdict(self)
        body["eos_token_ids"] = list(self.eos_token_ids)
        if self.kv_cache == "float32":
            del body["kv_cache"]
        if not self.shared_buffer:
            del body["shared_buffer"]
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> CacheLayout:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(body) - fields
        if unknown:
            raise ValueError(f"unknown cache layout keys {sorted(unknown)}")
        if body.get("kv_cache", "float32") not in ("float32", "int8"):
            raise ValueError(f"kv_cache must be float32 or int8, got {body['kv_cache']!r}")
        return cls(**{**body, "eos_token_ids": tuple(int(t) for t in body["eos_token_ids"])})


def step_feeds(
    input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The graph's inputs for one step: `attention_mask` covers past and new tokens; positions
    continue from the past's length."""
    past_len = next(iter(past.values())).shape[2]
    batch, seq = input_ids.shape
    positions = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq))
    return {
        "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
        "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
        "position_ids": np.ascontiguousarray(positions),
        **past,
    }


def cached_causal_mask(attention_mask: torch.Tensor, seq_len, past_len) -> torch.Tensor:
    """Additive [batch, 1, seq, past + seq] mask: query i (at position past + i) sees keys up to
    its own position that `attention_mask` marks as tokens; MASK_VALUE elsewhere."""
    keys = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    queries = torch.arange(seq_len, device=attention_mask.device) + past_len
    allowed = (keys[None, :] <= queries[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
    return (~allowed).to(torch.float32) * MASK_VALUE


class CachedCausalLM(nn.Module):
    """A Llama `CausalLM` (models/smollm2.py) as one decode step with a KV cache; same modules
    and parameter names, so the weights are shared."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.model = lm.model
        self.lm_head = lm.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        decoder = self.model
        dtype = decoder.embed_tokens.weight.dtype  # tables and mask in the weights' float type (a no-op in float32)
        tables = decoder.layer_tables(lambda rotary: rotary.at(position_ids), dtype)
        seq_len, past_len = input_ids.shape[1], past_key_values[0].shape[2]
        mask = cached_causal_mask(attention_mask, seq_len, past_len).to(dtype)
        masks = decoder.layer_masks(mask, seq_len, past_len, attention_mask.shape[1])
        x = decoder.embed(input_ids, position_ids)
        presents: list[torch.Tensor] = []
        for i, (layer, (cos, sin), layer_mask) in enumerate(zip(decoder.layers, tables, masks)):
            x, (key, value) = layer(x, cos, sin, layer_mask, (past_key_values[2 * i], past_key_values[2 * i + 1]))
            presents += [key, value]
        return (decoder.logits(self.lm_head(decoder.finish(x))), *presents)

    def full_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The wrapped model's logits for whole sequences (no cache)."""
        decoder = self.model
        return decoder.logits(self.lm_head(decoder(input_ids)))

    def step(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One step on numpy feeds (graph input names): logits and presents, in output order."""
        layers = len(self.model.layers)
        with torch.no_grad():
            out = self(
                torch.from_numpy(feeds["input_ids"]),
                torch.from_numpy(feeds["attention_mask"]),
                torch.from_numpy(feeds["position_ids"]),
                [torch.from_numpy(feeds[name]) for name in past_names(layers)],
            )
        return [t.numpy() for t in out]


class CausalLMWithCache(BundledModel):
    """The bundled-model interface of a Llama decoder with a KV cache and a tokenizer.

    Subclasses give `_float_lm()` (the full-sequence `CausalLM`), `tokenizer()` and `layout`."""

    task = "perplexity"
    output_names: tuple[str, ...] = ("logits",)
    layout: CacheLayout
    seq_len: int = 128

    @abc.abstractmethod
    def _float_lm(self) -> nn.Module:
        """The full-sequence float32 CausalLM, eval mode."""

    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """A transformers tokenizer (saved into the artifact with `save_pretrained`)."""

    @property
    def input_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.layout.input_names)

    def build(self) -> CachedCausalLM:
        return self._module()

    @functools.lru_cache(maxsize=1)  # noqa: B019 (one module per model object, built once)
    def _module(self) -> CachedCausalLM:
        return CachedCausalLM(self._float_lm()).eval()

    def example_inputs(self) -> dict[str, Any]:
        """Batch 2, 3 new tokens after a past of 4 (random keys and values): sizes torch.export
        does not specialise."""
        generator = torch.Generator().manual_seed(0)
        batch, seq, past = 2, 3, 4
        shape = (batch, self.layout.num_kv_heads, past, self.layout.head_dim)
        return {
            "input_ids": (torch.arange(batch * seq, dtype=torch.int64).reshape(batch, seq) * 997 + 11) % self.layout.vocab_size,
            "attention_mask": torch.ones(batch, past + seq, dtype=torch.int64),
            "position_ids": torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous(),
            "past_key_values": [torch.randn(shape, generator=generator) for _ in range(2 * self.layout.num_layers)],
        }

    def dynamic_shapes(self) -> dict[str, Any]:
        """Batch, sequence, past and total length are dynamic."""
        past = {0: "batch", 2: "past_sequence_length"}
        return {
            "input_ids": {0: "batch", 1: "sequence_length"},
            "attention_mask": {0: "batch", 1: "total_sequence_length"},
            "position_ids": {0: "batch", 1: "sequence_length"},
            "past_key_values": [dict(past) for _ in range(2 * self.layout.num_layers)],
        }

    # ---------------------------------------------------------------- data

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer()(text, add_special_tokens=False)["input_ids"])

    def _rows(self, samples: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token rows [batch, len] and their 0/1 mask: texts right-padded (or cut) to `seq_len`,
        integer windows as given."""
        if isinstance(samples, str):
            raise UserError(f"model '{self.name}' takes a list of texts or an array of token windows")
        if len(samples) and all(isinstance(s, str) for s in samples):
            pad = self.layout.pad_token_id if self.layout.pad_token_id is not None else self.layout.eos_token_ids[0]
            rows = np.full((len(samples), self.seq_len), pad, dtype=np.int64)
            mask = np.zeros_like(rows)
            for row, row_mask, text in zip(rows, mask, samples):
                ids = self.encode(text)[: self.seq_len]
                row[: len(ids)] = ids
                row_mask[: len(ids)] = 1
            return rows, mask
        ids = np.asarray(samples)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise UserError(
                f"model '{self.name}': expected texts or integer token windows [batch, seq], got {ids.shape} {ids.dtype}"
            )
        return ids.astype(np.int64), np.ones(ids.shape, np.int64)

    def inputs_from_raw(self, samples: Sequence[str] | np.ndarray) -> dict[str, np.ndarray]:
        """One prefill step (empty past) per batch of samples."""
        rows, mask = self._rows(samples)
        return step_feeds(rows, mask, self.layout.empty_past(len(rows)))

    def batches_from_raw(self, samples: Sequence[str] | np.ndarray) -> list[dict[str, np.ndarray]]:
        """Calibration: a prefill step on all but the last `DECODE_STEPS` tokens (empty past), then
        one single-token step per remaining token, its past the float model's presents."""
        rows, mask = self._rows(samples)
        steps = DECODE_STEPS if rows.shape[1] > DECODE_STEPS else 0
        return self.prefill_then_decode(rows, mask, rows.shape[1] - steps)

    def prefill_then_decode(self, rows: np.ndarray, mask: np.ndarray, prefill: int) -> list[dict[str, np.ndarray]]:
        """Feeds of a prefill of `prefill` tokens and single-token steps for the rest of `rows`."""
        module = self._module()
        feeds = step_feeds(rows[:, :prefill], mask[:, :prefill], self.layout.empty_past(len(rows)))
        batches = [feeds]
        names = past_names(self.layout.num_layers)
        for t in range(prefill, rows.shape[1]):
            presents = module.step(feeds)[1:]
            feeds = step_feeds(rows[:, t : t + 1], mask[:, : t + 1], dict(zip(names, presents)))
            batches.append(feeds)
        return batches

    def probe_window(self) -> np.ndarray:
        """Two 16-token windows of real text for the probe."""
        raise NotImplementedError

    def probe_inputs(self) -> dict[str, np.ndarray]:
        """A one-token decode step after a 15-token past (from the float model), on two windows: the
        step generation repeats, and one ONNX Runtime's GroupQueryAttention (`lower-ort{attention=fused}`)
        runs at a batch of two (its CPU kernel takes several new tokens after a past only at batch 1)."""
        rows = self.probe_window()
        mask = np.ones_like(rows)
        module = self._module()
        prefill = step_feeds(rows[:, :PROBE_PAST], mask[:, :PROBE_PAST], self.layout.empty_past(len(rows)))
        presents = module.step(prefill)[1:]
        return step_feeds(rows[:, PROBE_PAST:], mask, dict(zip(past_names(self.layout.num_layers), presents)))

    def full_logits(self, input_ids: np.ndarray) -> np.ndarray:
        """The float model's logits for whole sequences, without the cache."""
        with torch.no_grad():
            return self._module().full_logits(torch.from_numpy(input_ids)).numpy()
