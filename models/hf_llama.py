"""Hugging Face Llama, Mistral, Phi-3, Qwen2 and Qwen3 causal LMs as models with a KV cache: a
`package.module:function` source that returns `(model, tokenizer)` is rebuilt as our Llama decoder
(`models/smollm2.py`, with Qwen2's Q/K/V biases and Qwen3's query and key norms where the weights
have them) with the model's weights and captured with the cache layout of `models/causal_lm.py`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from qcompiler.errors import UserError
from qcompiler.models import smollm2
from qcompiler.models.causal_lm import CacheLayout, CausalLMWithCache


class LlamaWithCache(CausalLMWithCache):
    """A Llama-style decoder given as a module (a `package.module:function` source returning a
    Hugging Face Llama, Mistral, Phi-3, Qwen2 or Qwen3 causal LM, or a test's random one) with its tokenizer."""

    summary = "a Llama-style causal LM with a KV cache"

    def __init__(self, name: str, lm: nn.Module, tokenizer: Any, layout: CacheLayout, seq_len: int = 128):
        self.name, self._lm, self._tokenizer, self.layout, self.seq_len = name, lm.eval(), tokenizer, layout, seq_len

    def _float_lm(self) -> nn.Module:
        return self._lm

    def tokenizer(self) -> Any:
        return self._tokenizer

    def probe_window(self) -> np.ndarray:
        """Two deterministic 16-token windows (no tokenizer text is assumed)."""
        ids = (np.arange(32, dtype=np.int64).reshape(2, 16) * 997 + 11) % self.layout.vocab_size
        return ids


def is_hf_causal_lm(obj: Any) -> bool:
    """A Hugging Face model with a language-model head (`...ForCausalLM`)."""
    return isinstance(obj, nn.Module) and hasattr(obj, "config") and type(obj).__name__.endswith("ForCausalLM")


# Hugging Face architectures that are a Llama decoder, and what each adds to it: Qwen2 biases on the Q, K
# and V projections; Qwen3 an RMSNorm of each query and key head and heads of their own width; Phi-3
# Q, K and V stored as one weight, gate and up as another; Mistral and Phi-3 (and Qwen2 and Qwen3
# where enabled) a sliding attention window
ARCHITECTURES = ("llama", "mistral", "phi3", "qwen2", "qwen3")


def from_hf(name: str, hf_model: nn.Module, tokenizer: Any) -> LlamaWithCache:
    """Our Llama decoder (models/smollm2.py) with the weights of a Hugging Face Llama, Mistral, Phi-3,
    Qwen2 or Qwen3 causal LM, as a model with a KV cache; other architectures are refused. A sliding attention
    window of W positions limits the cache to W positions, within which every token attends to all
    earlier ones, as with full attention."""
    cfg = hf_model.config
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"'{name}' returned a {type(hf_model).__name__} ({model_type or '?'}); the KV-cache capture takes "
            f"{', '.join(ARCHITECTURES)} causal LMs; return (module, example_inputs) to capture it without a cache"
        )
    state = {k: v.detach().to(torch.float32) for k, v in hf_model.state_dict().items() if "rotary_emb" not in k}
    if any(key.startswith("model.layers.") and ".mlp." in key and key.endswith(".bias") for key in state):
        raise UserError(f"'{name}': the KV-cache capture takes models without MLP biases")
    rope = _rope(cfg)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UserError(f"'{name}': the KV-cache capture takes rotary embeddings of type {', '.join(ROPE_TYPES)}, got "
                        f"'{rope_type}'; return (module, example_inputs) to capture it without a cache")
    inv_freq, attention_factor = _rotary_frequencies(cfg, rope_type)
    ours = _config(cfg, state, rotary_attention_factor=attention_factor)
    state = _split_fused_projections(state, ours)
    lm = smollm2.CausalLM(ours)
    if "lm_head.weight" not in state or not getattr(cfg, "tie_word_embeddings", False):
        if "lm_head.weight" in state:
            lm.lm_head.weight = nn.Parameter(torch.empty_like(state["lm_head.weight"]))
        else:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    smollm2.load_exact(lm, state, name)
    if inv_freq is not None:
        with torch.no_grad():
            lm.model.rotary.inv_freq.copy_(inv_freq)
    return LlamaWithCache(name, lm, tokenizer, smollm2.layout_of(ours, tokenizer, model_type))


def _split_fused_projections(state: dict[str, torch.Tensor], ours: smollm2.LlamaConfig) -> dict[str, torch.Tensor]:
    """Phi-3's fused weights as Llama's: `qkv_proj` rows -> `q_proj`, `k_proj`, `v_proj` (heads, kv
    heads, kv heads wide), `gate_up_proj` rows -> `gate_proj` (the first half), `up_proj`."""
    sizes = [ours.num_heads * ours.head_dim, ours.num_kv_heads * ours.head_dim, ours.num_kv_heads * ours.head_dim]
    split = {}
    for key, value in state.items():
        if key.endswith(".self_attn.qkv_proj.weight"):
            prefix = key[: -len("qkv_proj.weight")]
            split.update({f"{prefix}{part}_proj.weight": w for part, w in zip("qkv", torch.split(value, sizes))})
        elif key.endswith(".mlp.gate_up_proj.weight"):
            prefix = key[: -len("gate_up_proj.weight")]
            split.update({f"{prefix}{part}_proj.weight": w for part, w in zip(("gate", "up"), value.chunk(2))})
        else:
            split[key] = value
    return split


def _rope(cfg: Any) -> dict:
    return getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _rotary_size(cfg: Any) -> int:
    """The leading width of each head that is rotated: `partial_rotary_factor` of it (Phi-4-mini's 0.75)."""
    factor = _rope(cfg).get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    return int(_head_dim(cfg) * float(factor or 1.0))


def _config(cfg: Any, state: dict[str, torch.Tensor], rotary_attention_factor: float) -> smollm2.LlamaConfig:
    """Our decoder's hyper-parameters from a Hugging Face config; biases and query/key norms where
    the weights have them; the factor a scaled rotary embedding puts on its tables."""
    heads = cfg.num_attention_heads
    head_dim = _head_dim(cfg)
    theta = _rope(cfg).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return smollm2.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_heads=heads,
        num_kv_heads=cfg.num_key_value_heads, intermediate_size=cfg.intermediate_size, rope_theta=float(theta),
        eps=float(cfg.rms_norm_eps), max_positions=_positions(cfg),
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in state, o_bias="model.layers.0.self_attn.o_proj.bias" in state,
        head_size=0 if head_dim * heads == cfg.hidden_size else int(head_dim),
        qk_norm="model.layers.0.self_attn.q_norm.weight" in state,
        rotary_size=0 if _rotary_size(cfg) == head_dim else _rotary_size(cfg), rotary_attention_factor=rotary_attention_factor,
    )


# rotary embeddings taken, their frequencies and table factor computed as transformers computes them when it
# builds the model: Llama 3.1/3.2's `llama3`, `linear`, `yarn` (Qwen2.5's long context), `dynamic`
# (which changes nothing within the model's positions) and `longrope` (Phi-3.5, Phi-4-mini: its short
# factors, within the positions it was trained on, which the cache then holds)
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def _rotary_frequencies(cfg: Any, rope_type: str) -> tuple[torch.Tensor | None, float]:
    """(inverse frequencies [rotated width / 2] in float32, the factor on the cos and sin tables) of a
    scaled rotary embedding; (None, 1.0) for the default one, which our decoder computes from theta."""
    if rope_type == "default":
        return None, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    return inv_freq.to(torch.float32), float(factor)


def _positions(cfg: Any) -> int:
    """The positions the cache holds: the model's, or fewer where a sliding window would start to
    drop early tokens (Mistral's and Phi-3's `sliding_window`; Qwen2's and Qwen3's where a layer type
    says so, or `use_sliding_window` where the config lists no layer types), or those it was trained on
    where a `longrope` embedding switches to its long factors beyond them."""
    positions = int(cfg.max_position_embeddings)
    rope = _rope(cfg)
    if rope.get("rope_type", rope.get("type")) == "longrope":
        original = rope.get("original_max_position_embeddings", getattr(cfg, "original_max_position_embeddings", None))
        positions = min(positions, int(original or positions))
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        sliding = "sliding_attention" in layer_types
    else:
        sliding = cfg.model_type in ("mistral", "phi3") or bool(getattr(cfg, "use_sliding_window", False))
    return min(positions, int(window)) if sliding and window is not None else positions
