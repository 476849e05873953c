"""What an artifact of a causal LM with a KV cache carries beside `model.onnx`, and reading it back.

At compile time (ort target): the tokenizer's files (`save_pretrained`: `tokenizer.json`,
`tokenizer_config.json`, ...), `genai_config.json` (the file ONNX Runtime GenAI's `og.Model(DIR)`
reads: the decoder's input and output names, heads, layers, token ids, greedy search; not for an
int8 cache, which ONNX Runtime GenAI cannot feed) and, in the manifest, a `causal_lm` section with
the cache layout (`models/causal_lm.py: CacheLayout`, `kv_cache: int8` for an int8 cache).
`qcompiler generate` and `qcompiler eval` read the layout and the tokenizer back from the folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from qcompiler.errors import UserError, first_line

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_KEY = "causal_lm"


def genai_config(layout) -> dict[str, Any]:
    """ONNX Runtime GenAI's model configuration for the decoder graph in `model.onnx`."""
    eos = list(layout.eos_token_ids)
    return {
        "model": {
            "bos_token_id": layout.bos_token_id if layout.bos_token_id is not None else eos[0],
            "context_length": layout.max_positions,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": layout.head_dim,
                "hidden_size": layout.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": layout.num_heads,
                "num_hidden_layers": layout.num_layers,
                "num_key_value_heads": layout.num_kv_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": layout.pad_token_id if layout.pad_token_id is not None else eos[0],
            "type": layout.model_type,
            "vocab_size": layout.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": layout.max_positions,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": layout.shared_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_lm_files(folder: Path, bundled, layout) -> list[Path]:
    """Write the tokenizer files and `genai_config.json` of a causal LM with cache `layout` into the
    artifact folder; no `genai_config.json` for an int8 cache, which ONNX Runtime GenAI cannot feed
    (its configuration names no cache scales): `qcompiler generate` runs that artifact."""
    before = set(folder.iterdir())
    bundled.tokenizer().save_pretrained(str(folder))
    if layout.kv_cache == "float32":
        (folder / GENAI_CONFIG).write_text(json.dumps(genai_config(layout), indent=2, sort_keys=False) + "\n")
    else:
        log.info("no %s: ONNX Runtime GenAI takes no %s KV cache; run the artifact with `qcompiler generate`", GENAI_CONFIG, layout.kv_cache)
    return sorted(set(folder.iterdir()) - before)


def read_layout(artifact: Path):
    """The cache layout recorded in an artifact's manifest; a UserError when the folder holds no
    causal LM with a KV cache."""
    from qcompiler.models.causal_lm import CacheLayout

    manifest_path = artifact / "manifest.json"
    if not (artifact / "model.onnx").is_file() or not manifest_path.is_file():
        raise UserError(f"'{artifact}' is not a compiled artifact (no model.onnx or manifest.json); give the -o directory of `qcompiler compile`")
    try:
        body = json.loads(manifest_path.read_text()).get(MANIFEST_KEY)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read '{manifest_path}' ({first_line(str(exc))}); compile the model again") from None
    if not body:
        raise UserError(
            f"'{artifact}' holds no causal LM with a KV cache; compile one (e.g. `qcompiler compile smollm2-135m-kv -o DIR`)"
        )
    try:
        return CacheLayout.from_json(body)
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"'{manifest_path}': its causal_lm section is malformed ({first_line(str(exc))}); compile the model again") from None


def read_tokenizer(artifact: Path):
    """The artifact's tokenizer (the `tokenizers` library, from `tokenizer.json`)."""
    path = artifact / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"'{artifact}' has no {TOKENIZER_FILE}; compile the model again (the compiler copies its tokenizer there)")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise UserError(f"cannot read the tokenizer '{path}' ({first_line(str(exc))}); compile the model again") from None
