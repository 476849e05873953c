"""Blocks found in the IR of the three bundled models (slow: captures each model)."""

import pytest

import qcompiler
from qcompiler.analysis.blocks import find_blocks, is_weighted

# per model: (blocks, weighted layers in each block but the last, weighted layers in the last)
EXPECTED = {
    "smollm2-135m": (31, 7, 1),  # 30 decoder layers (q, k, v, o, gate, up, down) + final norm and lm_head
    "minilm-l6": (6, 6, 6),  # 6 encoder layers (q, k, v, o, intermediate, output); pooling joins the last
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm-l6", "smollm2-135m", "craft"])
def test_blocks_of_bundled_models(name, tmp_path):
    model = qcompiler.compile(name, tmp_path / "m", pipeline="default", drift=False).model
    blocks = find_blocks(model.graph)
    nodes = [n for b in blocks for n in b.nodes]
    assert nodes == list(model.graph)  # every node once, in order
    weighted = [n for n in model.graph if is_weighted(n)]
    assert [n for b in blocks for n in b.layers] == weighted
    assert all(b.layers for b in blocks)
    if name in EXPECTED:
        count, per_block, last = EXPECTED[name]
        assert len(blocks) == count
        assert [len(b.layers) for b in blocks] == [per_block] * (count - 1) + [last]
        assert len(blocks[1].outputs) == 1  # the residual stream alone crosses a layer boundary
    else:  # CRAFT: conv stages between pooling / resizing, skip tensors crossing to the decoder
        assert len(blocks) >= 4
        assert all(n.op_type == "Conv" for b in blocks for n in b.layers)
