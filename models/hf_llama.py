"""Hugging Face Llama, Mistral, Ministral, Phi-3, Qwen2, Qwen3, Seed-OSS, Gemma (1, 2, 3), Granite,
SmolLM3, OLMo 2, OLMo 3, EXAONE 4, ERNIE 4.5, Helium, StableLM, StarCoder2, Phi-2, GPT-NeoX, GPT-J, CodeGen,
GPT-2, GPT-BigCode, GPT-Neo, OPT, BLOOM, MPT, Persimmon, Cohere, Cohere 2, Arcee, Nemotron, Apertus, GLM, GLM-4, Falcon, OLMo, HunYuan,
Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE causal LMs as models with a KV cache: a `package.module:function` source that returns `(model, tokenizer)`
is rebuilt as our Llama decoder (`models/smollm2.py`, with what each architecture adds to Llama, see
ARCHITECTURES) with the model's weights and captured with the cache layout of `models/causal_lm.py`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from qcompiler.errors import UserError
from qcompiler.models import smollm2
from qcompiler.models.causal_lm import CacheLayout, CausalLMWithCache


class LlamaWithCache(CausalLMWithCache):
    """A Llama-style decoder given as a module (a `package.module:function` source returning a
    Hugging Face causal LM of one of ARCHITECTURES, or a test's random one) with its tokenizer."""

    summary = "a Llama-style causal LM with a KV cache"

    seq_len = 128  # the tokens of a calibration or evaluation window

    def __init__(self, name: str, lm: nn.Module, tokenizer: Any, layout: CacheLayout, seq_len: int = seq_len):
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
    """A Hugging Face model with a language-model head (`...ForCausalLM`, GPT-2's `GPT2LMHeadModel`)."""
    return isinstance(obj, nn.Module) and hasattr(obj, "config") and type(obj).__name__.endswith(("ForCausalLM", "LMHeadModel"))


# Hugging Face architectures that are a Llama decoder, and what each adds to it: Qwen2 biases on the Q, K
# and V projections; Qwen3 an RMSNorm of each query and key head and heads of their own width; Phi-3
# Q, K and V stored as one weight, gate and up as another; Mistral and Phi-3 (and Qwen2 and Qwen3
# where enabled) a sliding attention window; Gemma scaled embeddings, norms that scale by 1 + their
# weight and a GELU gate; Gemma 2 also sandwich norms, soft-capped scores and logits and every other
# layer sliding over a window; Gemma 3 (its text model) sandwich norms, Qwen3's query and key norms,
# and local layers that slide over a window and rotate with a theta of their own; Granite scalar
# multipliers on the embeddings, scores, residual branches and logits; SmolLM3 unrotated layers;
# OLMo 2 norms after the attention and the MLP only, and norms of the whole query and key projections;
# OLMo 3 OLMo 2's with sliding layers of their own rotary theta; EXAONE 4 OLMo 2's norms, Qwen3's
# query and key norms, sliding layers and, where it has them, unrotated global layers. Ministral is
# Mistral with sliding layers named by layer type, Seed-OSS Llama with Q, K and V biases; ERNIE 4.5
# and Helium rotate each pair of neighbouring values of a head, not its two halves. StableLM has
# LayerNorms with biases, a partial rotation and, where it says so, attention and MLP side by side;
# StarCoder2 LayerNorms, biases on every linear, an MLP without a gate and a sliding window (StableLM 2 12B, Phi-2 and
# Cohere's Command R+ where they say so also a LayerNorm of each query and key head, QK_LAYER_NORMS; Persimmon always,
# with GPT-NeoX's Q, K and V layout and ReLU squared); Phi-2
# (`phi`) StarCoder2's LayerNorms, biases and MLP, attention and MLP side by side on one norm, a partial
# rotation and a biased head; GPT-NeoX (Pythia) the same with two norms side by side, Q, K and V one
# weight interleaved per head and an exact GELU; GPT-J Phi-2's block with neighbouring values rotated; CodeGen GPT-J's
# with Q, K and V in one weight laid out over 4 shards (each shard's queries, values, then keys) and no biases there.
# GPT-2, GPT-BigCode (StarCoder 1, SantaCoder) and OPT rotate nothing: they add a learned table of
# positions to the token embeddings, and have LayerNorms, biases and an MLP without a gate (GPT-2 its
# weights stored transposed and Q, K and V in one; GPT-BigCode one K/V head where `multi_query`; OPT
# ReLU; GPT-Neo unscaled scores and local layers that slide over a window). BLOOM rotates nothing either: each head adds ALiBi's slope times the key's position to its scores;
# it normalizes its token embeddings, and has GPT-NeoX's Q, K and V layout, LayerNorms, biases and an MLP without
# a gate (tanh GELU); MPT too, with Q, K and V one after the other, LayerNorms without biases, no biases at all
# and an exact GELU. Cohere has Phi-2's side-by-side block with LayerNorms without a bias, a gated MLP, neighbouring
# values rotated and scaled logits, Cohere 2 also sliding layers and unrotated global ones; Arcee and
# Nemotron an MLP without a gate and ReLU squared, Nemotron LayerNorms that scale by 1 + their weight and
# a partial rotation; Apertus an MLP without a gate and the xIELU activation, its slopes learned per
# layer, and Qwen3's query and key norms. GLM has Phi-3's fused gate and up, Q, K and V biases and part of each head rotated
# as neighbouring pairs, GLM-4 also Gemma 2's sandwich norms. Falcon has GPT-NeoX's LayerNorms, MLP and
# side-by-side blocks (on one norm, or two in its new architecture; one after the other where it says
# so), Q, K and V in one weight laid out per head, as one K/V head, or per K/V group. OLMo (1) has
# LayerNorms that learn neither weight nor bias. HunYuan (dense) normalizes each query and key head after
# the rotation, which is NTK-scaled by `alpha`. Mixtral, Qwen2-MoE (Qwen2's attention, and a shared
# expert), Qwen3-MoE (Qwen3's attention) and OLMoE (OLMo 2's query and key norms, pre-norms) have a
# mixture of experts in place of the MLP, their experts' weights stored as one tensor each for gate and
# up and for down.
ARCHITECTURES = ("llama", "mistral", "ministral", "phi3", "qwen2", "qwen3", "seed_oss", "gemma", "gemma2", "gemma3_text",
                 "granite", "smollm3", "olmo2", "olmo3", "exaone4", "ernie4_5", "helium", "stablelm", "starcoder2", "phi",
                 "gpt_neox", "gptj", "gpt2", "gpt_bigcode", "opt", "cohere", "cohere2", "arcee", "nemotron", "glm", "glm4",
                 "falcon", "olmo", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "apertus", "hunyuan_v1_dense", "bloom", "gpt_neo", "mpt", "codegen", "persimmon")
GEMMA = ("gemma", "gemma2", "gemma3_text")
POST_NORMS = ("olmo2", "olmo3", "exaone4")  # norms after the attention and the MLP only
# `genai_config.json`'s type where ONNX Runtime GenAI (0.18) knows the architecture by another name
# or not at all: it runs our graph either way, the type choosing its decoder-only handling
GENAI_TYPES = {"ministral": "mistral", "seed_oss": "llama", "olmo2": "olmo", "olmo3": "olmo", "exaone4": "llama", "helium": "llama",
               "stablelm": "llama", "starcoder2": "llama", "phi": "llama", "gpt_neox": "llama", "gptj": "llama", "gpt2": "llama",
               "gpt_bigcode": "llama", "opt": "llama", "cohere": "llama", "cohere2": "llama", "arcee": "llama", "nemotron": "llama",
               "glm": "llama", "glm4": "llama", "falcon": "llama", "mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3",
               "olmoe": "olmo", "apertus": "llama", "hunyuan_v1_dense": "llama", "bloom": "llama", "gpt_neo": "llama", "mpt": "llama", "codegen": "llama", "persimmon": "llama"}
# LayerNorms, not RMSNorms (with a bias but for Cohere's, with neither weight nor bias for OLMo's)
LAYER_NORMS = ("stablelm", "starcoder2", "phi", "gpt_neox", "gptj", "gpt2", "gpt_bigcode", "opt", "cohere", "cohere2", "nemotron",
               "falcon", "olmo", "bloom", "gpt_neo", "mpt", "codegen", "persimmon")
PLAIN_MLPS = ("starcoder2", "phi", "gpt_neox", "gptj", "gpt2", "gpt_bigcode", "opt", "arcee", "nemotron", "falcon",
              "apertus", "bloom", "gpt_neo", "mpt", "codegen", "persimmon")  # MLPs without a gate
PARALLEL = ("phi", "gptj", "cohere", "cohere2", "codegen")  # attention and MLP side by side on one norm
LEARNED_POSITIONS = ("gpt2", "gpt_bigcode", "opt", "gpt_neo")  # a learned table of positions added to the embeddings, no rotation
ALIBI_POSITIONS = 2048  # the positions a model without a position limit in its config is given (BLOOM's training length)
OPT_POSITION_OFFSET = 2  # OPT looks position p up in row p + 2 of its table
MPT_ALIBI_BIAS_MAX = 8  # the only one transformers' MPT computes, whatever its config says
CODEGEN_SHARDS = 4  # the model-parallel shards CodeGen's fused Q, K and V are laid out over
TRANSPOSED_LINEARS = ("gpt2",)  # linear weights stored [in, out] (GPT-2's Conv1D), not [out, in]
_GPT2_NAMES = (("transformer.wte.", "model.embed_tokens."), ("transformer.wpe.", "model.embed_positions."),
               ("transformer.ln_f.", "model.norm."), ("transformer.h.", "model.layers."), (".ln_1.", ".input_layernorm."),
               (".ln_2.", ".post_attention_layernorm."), (".attn.c_attn.", ".self_attn.qkv_proj."),
               (".attn.c_proj.", ".self_attn.o_proj."))
_UP_DOWN = ((".mlp.up_proj.", ".mlp.c_fc."), (".mlp.down_proj.", ".mlp.c_proj."))
_QK_LAYERNORMS = ((".self_attn.q_layernorm.", ".self_attn.q_norm."), (".self_attn.k_layernorm.", ".self_attn.k_norm."))
# the parameter names of the families whose names differ from Llama's (ours)
OUR_NAMES = {
    "phi": ((".self_attn.dense.", ".self_attn.o_proj."), (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."),
            ("model.final_layernorm.", "model.norm."), *_QK_LAYERNORMS),
    "stablelm": _QK_LAYERNORMS,
    "persimmon": ((".self_attn.query_key_value.", ".self_attn.qkv_interleaved."), (".self_attn.dense.", ".self_attn.o_proj."),
                  *_QK_LAYERNORMS, (".mlp.dense_h_to_4h.", ".mlp.c_fc."), (".mlp.dense_4h_to_h.", ".mlp.c_proj."), ("model.final_layernorm.", "model.norm.")),
    "gpt_neox": (("gpt_neox.embed_in.", "model.embed_tokens."), ("gpt_neox.final_layer_norm.", "model.norm."),
                 ("gpt_neox.layers.", "model.layers."), (".attention.dense.", ".self_attn.o_proj."),
                 (".attention.query_key_value.", ".self_attn.qkv_interleaved."), (".mlp.dense_h_to_4h.", ".mlp.c_fc."),
                 (".mlp.dense_4h_to_h.", ".mlp.c_proj."), ("embed_out.", "lm_head.")),
    "gptj": (("transformer.wte.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."), ("transformer.h.", "model.layers."),
             (".ln_1.", ".input_layernorm."), (".attn.out_proj.", ".self_attn.o_proj."), (".attn.", ".self_attn."),
             (".mlp.fc_in.", ".mlp.c_fc."), (".mlp.fc_out.", ".mlp.c_proj.")),
    "codegen": (("transformer.wte.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."), ("transformer.h.", "model.layers."),
                (".ln_1.", ".input_layernorm."), (".attn.out_proj.", ".self_attn.o_proj."), (".attn.", ".self_attn."),
                (".mlp.fc_in.", ".mlp.c_fc."), (".mlp.fc_out.", ".mlp.c_proj.")),
    "gpt2": _GPT2_NAMES,
    "gpt_bigcode": _GPT2_NAMES,
    # the model's last norm first: each layer's `final_layer_norm` is the norm before its MLP
    "opt": (("model.decoder.final_layer_norm.", "model.norm."), (".final_layer_norm.", ".post_attention_layernorm."),
            ("model.decoder.", "model."), (".self_attn_layer_norm.", ".input_layernorm."),
            (".self_attn.out_proj.", ".self_attn.o_proj."), (".fc1.", ".mlp.c_fc."), (".fc2.", ".mlp.c_proj.")),
    "arcee": _UP_DOWN,
    "apertus": (*_UP_DOWN, (".attention_layernorm.", ".input_layernorm."), (".feedforward_layernorm.", ".post_attention_layernorm.")),
    "nemotron": _UP_DOWN,
    # GLM-4's norm before the MLP first, as our name for its norm after the attention is the former's
    "glm4": ((".post_attention_layernorm.", ".pre_feedforward_layernorm."),
             (".post_self_attn_layernorm.", ".post_attention_layernorm."), (".post_mlp_layernorm.", ".post_feedforward_layernorm.")),
    "hunyuan_v1_dense": ((".self_attn.query_layernorm.", ".self_attn.q_norm."), (".self_attn.key_layernorm.", ".self_attn.k_norm.")),
    "gpt_neo": (("transformer.wte.", "model.embed_tokens."), ("transformer.wpe.", "model.embed_positions."),
                ("transformer.ln_f.", "model.norm."), ("transformer.h.", "model.layers."), (".ln_1.", ".input_layernorm."),
                (".ln_2.", ".post_attention_layernorm."), (".attn.attention.out_proj.", ".self_attn.o_proj."),
                (".attn.attention.", ".self_attn.")),
    "mpt": (("transformer.wte.", "model.embed_tokens."), ("transformer.norm_f.", "model.norm."), ("transformer.blocks.", "model.layers."),
            (".norm_1.", ".input_layernorm."), (".norm_2.", ".post_attention_layernorm."), (".attn.Wqkv.", ".self_attn.qkv_proj."),
            (".attn.out_proj.", ".self_attn.o_proj."), (".ffn.up_proj.", ".mlp.c_fc."), (".ffn.down_proj.", ".mlp.c_proj.")),
    "bloom": (("transformer.word_embeddings_layernorm.", "model.embed_norm."), ("transformer.word_embeddings.", "model.embed_tokens."),
              ("transformer.ln_f.", "model.norm."), ("transformer.h.", "model.layers."), (".self_attention.dense.", ".self_attn.o_proj."),
              (".self_attention.query_key_value.", ".self_attn.qkv_interleaved."), (".mlp.dense_h_to_4h.", ".mlp.c_fc."),
              (".mlp.dense_4h_to_h.", ".mlp.c_proj.")),
    "falcon": (("transformer.word_embeddings.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."),
               ("transformer.h.", "model.layers."), (".self_attention.dense.", ".self_attn.o_proj."),
               (".self_attention.query_key_value.", ".self_attn.qkv_proj."), (".mlp.dense_h_to_4h.", ".mlp.c_fc."),
               (".mlp.dense_4h_to_h.", ".mlp.c_proj."), (".ln_attn.", ".input_layernorm."), (".ln_mlp.", ".post_attention_layernorm.")),
}
QK_LAYER_NORMS = ("stablelm", "cohere", "phi", "persimmon")  # query and key norms, where they have them, are LayerNorms of each head
INTERLEAVED_ROTARY = ("ernie4_5", "helium", "gptj", "cohere", "cohere2", "glm", "glm4", "codegen")
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "relu": "relu",
               "relu2": "relu2", "xielu": "xielu"}


def from_hf(name: str, hf_model: nn.Module, tokenizer: Any) -> LlamaWithCache:
    """Our Llama decoder (models/smollm2.py) with the weights of a Hugging Face causal LM of one of
    ARCHITECTURES, as a model with a KV cache; other architectures are refused. A layer with a
    sliding attention window of W positions attends to the keys of the last W positions."""
    cfg = hf_model.config
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"'{name}' returned a {type(hf_model).__name__} ({model_type or '?'}); the KV-cache capture takes "
            f"{', '.join(ARCHITECTURES)} causal LMs; return (module, example_inputs) to capture it without a cache"
        )
    state = {k: v.detach().to(torch.float32) for k, v in hf_model.state_dict().items() if "rotary_emb" not in k}
    _refuse_what_our_decoder_lacks(name, cfg)
    state = _stacked_head_norms(_llama_names(state, cfg))
    if model_type in (*GEMMA, "nemotron"):  # Gemma's and Nemotron's norms scale by 1 + weight, ours by weight
        state = {k: v + 1.0 if k.endswith("norm.weight") else v for k, v in state.items()}
    if _activation(cfg) == "xielu":
        state = _xielu_slopes(state)
    rope = _rope(cfg)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UserError(f"'{name}': the KV-cache capture takes rotary embeddings of type {', '.join(ROPE_TYPES)}, got "
                        f"'{rope_type}'; return (module, example_inputs) to capture it without a cache")
    inv_freq, attention_factor = _rotary_frequencies(cfg, rope_type)
    long_inv_freq, long_from = _long_frequencies(cfg, rope_type)
    ours = _config(cfg, state, rotary_attention_factor=attention_factor, long_rope_from=long_from)
    state = _split_fused_projections(state, ours)
    lm = smollm2.CausalLM(ours)
    if "lm_head.weight" not in state or not getattr(cfg, "tie_word_embeddings", False):
        if "lm_head.weight" in state:
            lm.lm_head.weight = nn.Parameter(torch.empty_like(state["lm_head.weight"]))
        else:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    smollm2.load_exact(lm, state, name)
    with torch.no_grad():
        if inv_freq is not None:
            lm.model.rotary.inv_freq.copy_(inv_freq)
        if long_inv_freq is not None:
            lm.model.rotary.long_inv_freq.copy_(long_inv_freq)
    layout = smollm2.layout_of(ours, tokenizer, GENAI_TYPES.get(model_type, model_type))
    # a table of positions has no row past them: calibration windows stay within them
    seq_len = min(LlamaWithCache.seq_len, ours.max_positions) if ours.learned_positions else LlamaWithCache.seq_len
    return LlamaWithCache(name, lm, tokenizer, layout, seq_len=seq_len)


def _refuse_what_our_decoder_lacks(name: str, cfg: Any) -> None:
    """One line for what our decoder does not compute: a bidirectional attention, an activation it does not
    have, scaled local rotary embeddings, attention scaled per layer, and the family variants named below."""
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UserError(f"'{name}': the KV-cache capture takes causal attention (use_bidirectional_attention false)")
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "scale_attn_weights", True) is False:
        raise UserError(f"'{name}': the KV-cache capture takes attention scaled by 1 / sqrt(head size) in every layer "
                        "(scale_attn_weights true, scale_attn_by_inverse_layer_idx false)")
    if cfg.model_type == "mpt" and (cfg.attn_config.qk_ln or not cfg.attn_config.alibi
                                    or cfg.attn_config.alibi_bias_max != MPT_ALIBI_BIAS_MAX or cfg.logit_scale is not None):
        raise UserError(f"'{name}': the KV-cache capture takes MPT models with ALiBi of alibi_bias_max {MPT_ALIBI_BIAS_MAX}, "
                        "no query and key LayerNorms and no logit scale, the only MPT transformers runs (attn_config alibi "
                        "true, alibi_bias_max 8, qk_ln false; logit_scale none)")
    activation = _activation(cfg)
    if activation not in ACTIVATIONS:
        raise UserError(f"'{name}': the KV-cache capture takes MLP activations {', '.join(ACTIVATIONS)}, got '{activation}'")
    if activation == "xielu" and cfg.model_type not in PLAIN_MLPS:
        raise UserError(f"'{name}': the KV-cache capture takes xielu in MLPs without a gate only ({', '.join(PLAIN_MLPS)})")
    if _per_layer_type(cfg) and _rope(cfg, "sliding_attention").get("rope_type", "default") != "default":
        raise UserError(f"'{name}': the KV-cache capture takes local layers with the default rotary embedding")


def _activation(cfg: Any) -> str:
    if cfg.model_type == "bloom":  # BLOOM's own GELU, the tanh approximation
        return "gelu_pytorch_tanh"
    if cfg.model_type == "mpt":
        return "gelu"
    return (getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
            or getattr(cfg, "activation_function", None) or (cfg.activation if cfg.model_type == "falcon" else "silu"))


def _llama_names(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """The parameters under the names and in the layout our decoder gives them: renamed (OUR_NAMES),
    GPT-2's linear weights transposed to [out, in], GPT-BigCode's and Falcon's Q, K and V named by
    their layout (`_qkv_layout`), OPT's position table from the row of position 0 on."""
    renamed = {}
    layout = _qkv_layout(cfg)
    for key, value in state.items():
        for theirs, ours in OUR_NAMES.get(cfg.model_type, ()):
            key = key.replace(theirs, ours)
        if cfg.model_type in TRANSPOSED_LINEARS and key.startswith("model.layers.") and value.ndim == 2:
            value = value.t().contiguous()
        key = key.replace(".self_attn.qkv_proj.", f".self_attn.{layout}.")
        if cfg.model_type == "opt" and key == "model.embed_positions.weight":
            value = value[OPT_POSITION_OFFSET:]
        renamed[key] = value
    return renamed


def _stacked_head_norms(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """StableLM's query and key LayerNorms, one module a head (`q_norm.norms.<h>.weight`), as one weight
    [heads, head_dim] (`q_norm.weight`)."""
    stacked, heads = {}, {}
    for key, value in state.items():
        prefix, dot, rest = key.partition(".norms.")
        if dot and prefix.endswith(("self_attn.q_norm", "self_attn.k_norm")):
            index, kind = rest.split(".", 1)
            heads.setdefault(f"{prefix}.{kind}", {})[int(index)] = value
        else:
            stacked[key] = value
    stacked.update({key: torch.stack([per_head[h] for h in sorted(per_head)]) for key, per_head in heads.items()})
    return stacked


def _xielu_slopes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each xIELU's slopes as it computes them from its parameters: `positive` softplus(alpha_p), `negative`
    beta + softplus(alpha_n)."""
    slopes = {}
    for key, value in state.items():
        if key.endswith(".act_fn.alpha_p"):
            slopes[key.replace("alpha_p", "positive")] = torch.nn.functional.softplus(value)
        elif key.endswith(".act_fn.alpha_n"):
            beta = state[key.replace("alpha_n", "beta")]
            slopes[key.replace("alpha_n", "negative")] = beta + torch.nn.functional.softplus(value)
        else:
            slopes[key] = value
    return slopes


def _qkv_layout(cfg: Any) -> str:
    """How the rows of one Q, K and V weight are laid out: `qkv_proj` (all queries, then the keys, then
    the values: Phi-3, GPT-2, GPT-BigCode's and Falcon's with one K/V head), `qkv_codegen` (CodeGen's: over
    CODEGEN_SHARDS shards, each shard's queries, values, then keys), `qkv_interleaved` (each
    head's query, key and value in turn: GPT-NeoX, GPT-BigCode's and Falcon's with a K/V head per query
    head) or `qkv_grouped` (each K/V group's queries, then its key and value: Falcon's new architecture)."""
    if cfg.model_type == "falcon" and cfg.new_decoder_architecture:
        return "qkv_grouped"
    if cfg.model_type == "codegen":
        return "qkv_codegen"
    if cfg.model_type in ("gpt_bigcode", "falcon") and not cfg.multi_query:
        return "qkv_interleaved"
    return "qkv_proj"


def _split_fused_projections(state: dict[str, torch.Tensor], ours: smollm2.LlamaConfig) -> dict[str, torch.Tensor]:
    """Phi-3's fused weights as Llama's: `qkv_proj` rows -> `q_proj`, `k_proj`, `v_proj` (heads, kv
    heads, kv heads wide), `gate_up_proj` rows -> `gate_proj` (the first half), `up_proj`; GPT-NeoX's
    Q, K and V (`qkv_interleaved`, weight and bias), whose rows hold each head's query, key and value
    in turn -> `q_proj`, `k_proj`, `v_proj`; Falcon's grouped ones (`qkv_grouped`) likewise; biases as their
    weights; the experts' `gate_up_proj` [experts, 2 x width, hidden] and `down_proj` -> each expert's
    `gate_proj`, `up_proj` and `down_proj`."""
    sizes = [ours.num_heads * ours.head_dim, ours.num_kv_heads * ours.head_dim, ours.num_kv_heads * ours.head_dim]
    split = {}
    for key, value in state.items():
        if ".self_attn.qkv_interleaved." in key:
            prefix, kind = key.split(".qkv_interleaved.")
            per_head = value.reshape(ours.num_heads, 3, ours.head_dim, *value.shape[1:])
            split.update({f"{prefix}.{part}_proj.{kind}": per_head[:, i].reshape(-1, *value.shape[1:])
                          for i, part in enumerate("qkv")})
        elif ".mlp.experts.gate_up_proj" in key:  # [experts, 2 x width, hidden]: each expert's gate, then its up
            prefix = key[: -len("gate_up_proj")]
            for e, (gate, up) in enumerate(w.chunk(2) for w in value):
                split.update({f"{prefix}{e}.gate_proj.weight": gate, f"{prefix}{e}.up_proj.weight": up})
        elif ".mlp.experts.down_proj" in key:
            prefix = key[: -len("down_proj")]
            split.update({f"{prefix}{e}.down_proj.weight": w for e, w in enumerate(value)})
        elif ".self_attn.qkv_codegen." in key:  # [shards, (q, v, k), width / shards, hidden]
            prefix, kind = key.split(".qkv_codegen.")
            per_shard = value.reshape(CODEGEN_SHARDS, 3, -1, *value.shape[1:])
            split.update({f"{prefix}.{part}_proj.{kind}": per_shard[:, i].reshape(-1, *value.shape[1:])
                          for i, part in enumerate("qvk")})
        elif ".self_attn.qkv_grouped." in key:
            prefix, kind = key.split(".qkv_grouped.")
            group = ours.num_heads // ours.num_kv_heads
            per_group = value.reshape(ours.num_kv_heads, group + 2, ours.head_dim, *value.shape[1:])
            split.update({f"{prefix}.q_proj.{kind}": per_group[:, :group].reshape(-1, *value.shape[1:]),
                          f"{prefix}.k_proj.{kind}": per_group[:, group].reshape(-1, *value.shape[1:]),
                          f"{prefix}.v_proj.{kind}": per_group[:, group + 1].reshape(-1, *value.shape[1:])})
        elif ".self_attn.qkv_proj." in key:
            prefix, kind = key.split(".qkv_proj.")
            split.update({f"{prefix}.{part}_proj.{kind}": w for part, w in zip("qkv", torch.split(value, sizes))})
        elif key.endswith(".mlp.gate_up_proj.weight"):
            prefix = key[: -len("gate_up_proj.weight")]
            split.update({f"{prefix}{part}_proj.weight": w for part, w in zip(("gate", "up"), value.chunk(2))})
        else:
            split[key] = value
    return split


def _rope(cfg: Any, layer_type: str = "full_attention") -> dict:
    """The rotary parameters of the layers of `layer_type` (Gemma 3 keeps one set per layer type, the
    others one for all layers)."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return rope[layer_type] if isinstance(rope.get(layer_type), dict) else rope


def _per_layer_type(cfg: Any) -> bool:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return isinstance(rope.get("full_attention"), dict)


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _rotary_size(cfg: Any) -> int:
    """The leading width of each head that is rotated: `partial_rotary_factor` of it (Phi-4-mini's 0.75), or
    GPT-J's `rotary_dim`."""
    if getattr(cfg, "rotary_dim", None):
        return int(cfg.rotary_dim)
    factor = _rope(cfg).get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    return int(_head_dim(cfg) * float(factor or 1.0))


def _config(cfg: Any, state: dict[str, torch.Tensor], rotary_attention_factor: float,
            long_rope_from: int) -> smollm2.LlamaConfig:
    """Our decoder's hyper-parameters from a Hugging Face config; biases and query/key norms where
    the weights have them; the factor a scaled rotary embedding puts on its tables and the position
    from which a `longrope` one rotates by its long factors."""
    heads = cfg.num_attention_heads
    head_dim = _head_dim(cfg)
    positions = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "max_seq_len", None) or ALIBI_POSITIONS)
    window, sliding_layers = _sliding(cfg, positions)
    rotary_size = _rotary_size(cfg)
    theta = _rope(cfg).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    if _rope(cfg).get("alpha"):  # HunYuan's NTK scaling: a theta of theta x alpha^(d / (d - 2)), d the rotated width
        theta = theta * _rope(cfg)["alpha"] ** (rotary_size / (rotary_size - 2))
    return smollm2.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_heads=heads,
        num_kv_heads=_kv_heads(cfg), intermediate_size=_intermediate_size(cfg), rope_theta=float(theta),
        eps=_norm_eps(cfg), max_positions=positions, sliding_window=window, sliding_layers=sliding_layers,
        qkv_bias=any(f"model.layers.0.self_attn.{n}.bias" in state for n in ("q_proj", "qkv_proj", "qkv_interleaved", "qkv_grouped")),
        o_bias="model.layers.0.self_attn.o_proj.bias" in state,
        mlp_bias=any(key.startswith("model.layers.0.mlp.") and key.endswith(".bias") for key in state),
        head_bias="lm_head.bias" in state,
        head_size=0 if head_dim * heads == cfg.hidden_size else int(head_dim),
        qk_norm="model.layers.0.self_attn.q_norm.weight" in state,
        qk_norm_projection=cfg.model_type not in QK_LAYER_NORMS and _norm_width(state, "q_norm") == heads * head_dim != head_dim,
        qk_layer_norm=_qk_layer_norm(cfg, state), qk_norm_bias="model.layers.0.self_attn.q_norm.bias" in state,
        qk_norm_after_rotary=cfg.model_type == "hunyuan_v1_dense",
        rotary_size=0 if rotary_size == head_dim else rotary_size, rotary_attention_factor=rotary_attention_factor,
        long_rope_from=long_rope_from, clip_qkv=_clip_qkv(cfg),
        residual_from_norm=cfg.model_type == "bloom" and bool(cfg.apply_residual_connection_post_layernorm),
        **_family_fields(cfg),
    )


def _clip_qkv(cfg: Any) -> float:
    """The bound Q, K and V are clamped to (OLMo's and OLMoE's `clip_qkv`, MPT's `attn_config.clip_qkv`); 0: none."""
    clip = cfg.attn_config.clip_qkv if cfg.model_type == "mpt" else getattr(cfg, "clip_qkv", None)
    return float(clip or 0.0)


def _qk_layer_norm(cfg: Any, state: dict[str, torch.Tensor]) -> str:
    """"per_head" or "shared" where the query and key norms are LayerNorms (QK_LAYER_NORMS' families) with a
    weight for each head or one for all, "" otherwise."""
    weight = state.get("model.layers.0.self_attn.q_norm.weight")
    if cfg.model_type not in QK_LAYER_NORMS or weight is None:
        return ""
    return "per_head" if weight.ndim == 2 else "shared"


def _kv_heads(cfg: Any) -> int:
    """K/V heads: GPT-NeoX's, GPT-2's, GPT-J's, CodeGen's, OPT's, BLOOM's, GPT-Neo's, MPT's and Persimmon's one per
    query head, GPT-BigCode's and Falcon's one
    where `multi_query` (Falcon's new architecture `num_kv_heads`), the others' `num_key_value_heads` (one
    per query head where unset)."""
    if cfg.model_type == "gpt_bigcode" or (cfg.model_type == "falcon" and not cfg.new_decoder_architecture):
        return 1 if cfg.multi_query else cfg.num_attention_heads
    if cfg.model_type == "falcon":  # its new architecture: `num_kv_heads` groups
        return cfg.num_kv_heads
    if cfg.model_type in ("gpt_neox", "gpt2", "gptj", "opt", "bloom", "gpt_neo", "mpt", "codegen", "persimmon"):
        return cfg.num_attention_heads
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _intermediate_size(cfg: Any) -> int:
    """The MLP's width: OPT's `ffn_dim`, Falcon's `ffn_hidden_size`, GPT-2's, GPT-J's, GPT-BigCode's and CodeGen's
    `n_inner` and GPT-Neo's `intermediate_size` (4 x hidden where unset), BLOOM's and MPT's 4 x hidden."""
    if cfg.model_type == "opt":
        return int(cfg.ffn_dim)
    if cfg.model_type == "falcon":
        return int(cfg.ffn_hidden_size or 4 * cfg.hidden_size)
    if cfg.model_type in ("gpt2", "gptj", "gpt_bigcode", "codegen"):
        return int(cfg.n_inner or 4 * cfg.hidden_size)
    if cfg.model_type == "gpt_neo":
        return int(cfg.intermediate_size or 4 * cfg.hidden_size)
    if cfg.model_type in ("bloom", "mpt"):  # transformers' MPT MLP is 4 x hidden whatever its `expansion_ratio`
        return 4 * int(cfg.hidden_size)
    return int(cfg.intermediate_size)


def _norm_eps(cfg: Any) -> float:
    """The norms' epsilon, as each family names it (OPT's and OLMo's LayerNorms torch's default)."""
    for name in ("rms_norm_eps", "layer_norm_eps", "norm_epsilon", "layer_norm_epsilon", "norm_eps"):
        if getattr(cfg, name, None) is not None:
            return float(getattr(cfg, name))
    if cfg.model_type in ("opt", "olmo"):
        return 1e-5
    raise UserError("the model's config names no norm epsilon (rms_norm_eps, layer_norm_eps or norm_epsilon)")


def _norm_width(state: dict[str, torch.Tensor], name: str) -> int:
    weight = state.get(f"model.layers.0.self_attn.{name}.weight")
    return int(weight.numel()) if weight is not None else 0


def _family_fields(cfg: Any) -> dict[str, Any]:
    """The LlamaConfig fields in which the families other than Llama differ from it (the activation for
    all; local layers' theta for every model with rotary parameters per layer type)."""
    fields: dict[str, Any] = {"hidden_act": ACTIVATIONS[_activation(cfg)],
                              "rotary_interleaved": cfg.model_type in INTERLEAVED_ROTARY,
                              "layer_norm": cfg.model_type in LAYER_NORMS,
                              "layer_norm_bias": cfg.model_type not in ("cohere", "cohere2", "mpt"),
                              "layer_norm_weight": cfg.model_type != "olmo" and getattr(cfg, "layer_norm_elementwise_affine", True),
                              "plain_mlp": cfg.model_type in PLAIN_MLPS,
                              "parallel": cfg.model_type in PARALLEL or bool(getattr(cfg, "use_parallel_residual", False)),
                              "parallel_mlp_norm": cfg.model_type == "gpt_neox"}
    if cfg.model_type == "falcon":  # its new architecture side by side on two norms unless it says one
        two_norms = cfg.new_decoder_architecture and (cfg.num_ln_in_parallel_attn or 2) == 2
        fields.update(parallel=bool(cfg.parallel_attn or cfg.new_decoder_architecture), parallel_mlp_norm=two_norms)
    if cfg.model_type in LEARNED_POSITIONS:
        fields.update(learned_positions=True, unrotated_layers=tuple(range(cfg.num_hidden_layers)))
    if cfg.model_type == "gpt_neo":  # its scores are not scaled by 1 / sqrt(head size)
        fields["attention_scale"] = 1.0
    if cfg.model_type == "opt":  # OPT-350m: norms after the residual adds, no final norm, narrower embeddings
        fields.update(norms="pre" if cfg.do_layer_norm_before else "after_residual",
                      final_norm=bool(cfg.do_layer_norm_before and not cfg._remove_final_layer_norm),
                      embed_width=0 if cfg.word_embed_proj_dim == cfg.hidden_size else int(cfg.word_embed_proj_dim))
    if cfg.model_type == "mpt" and cfg.attn_config.softmax_scale:
        fields["attention_scale"] = float(cfg.attn_config.softmax_scale)
    if cfg.model_type in ("bloom", "mpt") or getattr(cfg, "alibi", False):
        fields.update(alibi_slopes=_alibi_slopes(cfg), unrotated_layers=tuple(range(cfg.num_hidden_layers)),
                      embed_norm=cfg.model_type == "bloom")
    if cfg.model_type == "falcon" and cfg.alibi:  # its slopes rounded to bfloat16, their products too, then scaled
        fields["alibi_bfloat16_scale"] = 1.0 / math.sqrt(_head_dim(cfg))
    if cfg.model_type in ("cohere", "cohere2"):
        fields["logit_scale"] = float(cfg.logit_scale)
    if cfg.model_type == "cohere2":  # rotated where it slides, not in its global layers
        fields["unrotated_layers"] = tuple(i for i, kind in enumerate(cfg.layer_types) if kind == "full_attention")
    if cfg.model_type == "glm4":
        fields["norms"] = "sandwich"
    if cfg.model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        fields.update(_experts(cfg))
    if cfg.model_type in GEMMA:
        fields["embed_scale"] = float(cfg.hidden_size**0.5)
    if cfg.model_type in ("gemma2", "gemma3_text"):
        fields.update(norms="sandwich", attention_scale=float(cfg.query_pre_attn_scalar**-0.5),
                      attention_softcap=float(getattr(cfg, "attn_logit_softcapping", None) or 0.0),
                      logit_softcap=float(getattr(cfg, "final_logit_softcapping", None) or 0.0))
    if cfg.model_type == "gemma3_text" or _per_layer_type(cfg):  # Gemma 3, OLMo 3
        local = [i for i, kind in enumerate(cfg.layer_types) if kind == "sliding_attention"]
        theta = _rope(cfg, "sliding_attention").get("rope_theta") if _per_layer_type(cfg) else cfg.rope_local_base_freq
        fields.update(local_rope_theta=float(theta), local_layers=tuple(local))
    if cfg.model_type == "granite":
        fields.update(embed_scale=float(cfg.embedding_multiplier), attention_scale=float(cfg.attention_multiplier),
                      residual_scale=float(cfg.residual_multiplier), logit_divisor=float(cfg.logits_scaling))
    if cfg.model_type in POST_NORMS:
        fields["norms"] = "post"
    if cfg.model_type == "exaone4" and cfg.sliding_window is not None:  # hybrid: global layers without rotation
        fields["unrotated_layers"] = tuple(i for i, kind in enumerate(cfg.layer_types) if kind == "full_attention")
    if cfg.model_type == "smollm3":
        fields["unrotated_layers"] = tuple(i for i, rotated in enumerate(cfg.no_rope_layers) if not rotated)
    return fields


def _alibi_slopes(cfg: Any) -> tuple[float, ...]:
    """Each head's ALiBi slope as transformers computes it (its `build_alibi_tensor`: the bias at position 1;
    Falcon's rounded to bfloat16; MPT's from `alibi_bias_max` 8, whose bias is the slope times the key's
    distance before the last key: the same scores but for a constant a row, which the softmax ignores)."""
    if cfg.model_type == "mpt":
        from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

        bias = build_mpt_alibi_tensor(cfg.num_attention_heads, 2, MPT_ALIBI_BIAS_MAX)  # [heads, 1, 2]: -slope, 0
        return tuple(-float(v) for v in bias[:, 0, 0])
    if cfg.model_type == "falcon":
        from transformers.models.falcon.modeling_falcon import build_alibi_tensor
    else:
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    bias = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), cfg.num_attention_heads, torch.float32)
    return tuple(float(v) for v in bias[:, 0, 1])


def _experts(cfg: Any) -> dict[str, Any]:
    """The mixture of experts of Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE: how many, how many a token uses, their
    width, whether the kept scores are renormalized, Qwen2-MoE's shared expert, and the Qwens' layers with a
    plain MLP (`mlp_only_layers`, and those off their `decoder_sparse_step`)."""
    experts = cfg.num_local_experts if cfg.model_type == "mixtral" else cfg.num_experts
    fields = {"experts": int(experts), "experts_per_token": int(cfg.num_experts_per_tok),
              "expert_size": int(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size),
              "normalize_routing": cfg.model_type == "mixtral" or bool(cfg.norm_topk_prob)}
    if cfg.model_type == "qwen2_moe":
        fields["shared_expert_size"] = int(cfg.shared_expert_intermediate_size)
    if cfg.model_type in ("qwen2_moe", "qwen3_moe"):
        step, only = int(cfg.decoder_sparse_step), set(cfg.mlp_only_layers or ())
        fields["dense_layers"] = tuple(i for i in range(cfg.num_hidden_layers) if i in only or (i + 1) % step)
    return fields


# rotary embeddings taken, their frequencies and table factor computed as transformers computes them when it
# builds the model: Llama 3.1/3.2's `llama3`, `linear`, `yarn` (Qwen2.5's long context), `dynamic`
# (which changes nothing within the model's positions) and `longrope` (Phi-3.5, Phi-4-mini: its short
# factors within the positions it was trained on, its long factors for a run that reaches beyond them)
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def _rotary_frequencies(cfg: Any, rope_type: str) -> tuple[torch.Tensor | None, float]:
    """(inverse frequencies [rotated width / 2] in float32, the factor on the cos and sin tables) of a
    scaled rotary embedding (of the full-attention layers where the model has one per layer type);
    (None, 1.0) for the default one and HunYuan's, which our decoder computes from theta (HunYuan's
    scaled by its `alpha`, `_config`)."""
    if rope_type == "default" or _rope(cfg).get("alpha"):  # HunYuan's `alpha`: the default one of a scaled theta
        return None, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    by_type = {"layer_type": "full_attention"} if _per_layer_type(cfg) else {}
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"), **by_type)
    return inv_freq.to(torch.float32), float(factor)


def _long_frequencies(cfg: Any, rope_type: str) -> tuple[torch.Tensor | None, int]:
    """(the long factors' inverse frequencies, the position from which a run rotates by them) of a
    `longrope` embedding trained on fewer positions than the model has, as transformers computes
    them (`original_max_position_embeddings`: a run whose largest position id is that or beyond);
    (None, 0) for every other embedding."""
    rope = _rope(cfg)
    original = rope.get("original_max_position_embeddings", getattr(cfg, "original_max_position_embeddings", None))
    if rope_type != "longrope" or not original or int(original) >= int(cfg.max_position_embeddings):
        return None, 0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    by_type = {"layer_type": "full_attention"} if _per_layer_type(cfg) else {}
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"), seq_len=int(original) + 1, **by_type)
    return inv_freq.to(torch.float32), int(original)


def _sliding(cfg: Any, positions: int) -> tuple[int, tuple[int, ...]]:
    """(W, the layers whose attention slides over the last W positions): GPT-Neo's `local` layers over its
    `window_size`, Mistral's, Phi-3's, StarCoder2's and
    Mixtral's `sliding_window` on every layer (Qwen3-MoE's where `use_sliding_window`), the others' on the layers their layer types name (Qwen2's and
    Qwen3's from `max_window_layers` on where the config lists no layer types), none where
    `use_sliding_window` is false; (0, ()) where no window is shorter than the positions the cache holds."""
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if cfg.model_type == "gpt_neo":  # its `local` layers see the last `window_size` positions
        window, layer_types = cfg.window_size, ["sliding_attention" if kind == "local" else "full_attention"
                                                for kind in cfg.attention_layers]
    if getattr(cfg, "use_sliding_window", None) is False:
        layers: tuple[int, ...] = ()  # Qwen2, Qwen3 and SmolLM3 slide only where enabled, whatever their layer types say
    elif layer_types:
        layers = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    elif cfg.model_type in ("mistral", "phi3", "starcoder2", "mixtral") or (
            cfg.model_type == "qwen3_moe" and getattr(cfg, "use_sliding_window", False)):
        layers = tuple(range(cfg.num_hidden_layers))
    elif getattr(cfg, "use_sliding_window", False):
        layers = tuple(range(int(getattr(cfg, "max_window_layers", 0) or 0), cfg.num_hidden_layers))
    else:
        layers = ()
    if window is None or not layers or int(window) >= positions:
        return 0, ()
    return int(window), layers
