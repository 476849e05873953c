"""A compile across a two-node Ray cluster on this machine (Ray's own `cluster_utils.Cluster`: a head
node and a second node of one CPU each, joined by address) equals the in-process artifact byte for
byte. Slow tier (starts two Ray nodes)."""

import pytest

import qcompiler
from test_parallel import PIPELINE, _artifact_bytes, _calibration, _chain

pytestmark = pytest.mark.slow


def test_compile_across_two_nodes_equals_the_in_process_artifact(tmp_path):
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    source = _chain(tmp_path / "chain.onnx", layers=4)
    data = _calibration(source)
    qcompiler.compile(source, tmp_path / "here", pipeline=PIPELINE, calibration=data, threads=1, drift=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        result = qcompiler.compile(source, tmp_path / "cluster", pipeline=PIPELINE, calibration=data, threads=1, drift=False,
                                   ray_address=cluster.address)
    finally:
        cluster.shutdown()
    stats = next(r.stats for r in result.records if r.name == "allocate-bits")
    assert len(stats["sensitivity"]["factor"]) == 4
    assert _artifact_bytes(tmp_path / "cluster") == _artifact_bytes(tmp_path / "here")
