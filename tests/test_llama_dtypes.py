"""The bundled Llama decoder (`models/smollm2.py`, with its KV-cache step in `models/causal_lm.py`)
in float16 and bfloat16, as `--dtype` captures it: rotary tables and masks follow the weights'
float type, and the outputs stay those of the float32 model."""

import pytest
import torch

from qcompiler.driver.capture import in_torch_dtype
from qcompiler.models.causal_lm import CachedCausalLM
from qcompiler.models.smollm2 import CausalLM, LlamaConfig


def _lm() -> CausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                      rope_theta=10000.0, eps=1e-5)
    return CausalLM(cfg).eval()


def dt_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _step_inputs(dtype):
    ids = torch.tensor([[5, 17, 40]])
    past = [torch.randn(1, 2, 4, 16, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(4)]
    return ids, torch.ones(1, 7, dtype=torch.int64), torch.arange(4, 7)[None], past


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_decoder_and_cache_step_run_in_the_weights_float_type(dtype):
    lm = _lm()
    low = _lm().to(dtype)
    ids = torch.tensor([[3, 9, 27, 81, 2]])
    with torch.no_grad():
        reference, logits = lm(ids), low(ids)
    assert logits.dtype == dtype
    assert torch.allclose(logits.float(), reference, atol=0.05 if dtype == torch.float16 else 0.3)
    # as --dtype converts it: the module and its float32 example inputs, the past tensors in a nested list
    step, example = in_torch_dtype(CachedCausalLM(lm), list(_step_inputs(torch.float32)), dt_name(dtype), copy=True)
    assert all(t.dtype == dtype for t in example[3])
    exported = torch.export.export(step, tuple(example))
    outputs = exported.module()(*_step_inputs(dtype))
    with torch.no_grad():
        want = CachedCausalLM(lm)(*_step_inputs(torch.float32))
    assert all(o.dtype == dtype for o in outputs)
    assert torch.allclose(outputs[0].float(), want[0], atol=0.05 if dtype == torch.float16 else 0.3)
