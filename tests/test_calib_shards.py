"""Calibration over shards of the batches (`calibration.collect` with an executor): the shards'
statistics merge into exactly those of one stream, for any shard count (on Ray:
tests/test_parallel.py)."""

import pickle

import numpy as np
import pytest

from qcompiler.analysis import calibration
from qcompiler.analysis.calibration import Accumulator, Histogram, collect, quantizable_inputs, stats_of
from tests.test_calibrate import mlp


@pytest.fixture(autouse=True)
def shards_of_one_batch(monkeypatch):
    """These tests cut a few batches into shards, one batch each if need be."""
    monkeypatch.setattr(calibration, "SHARD_MIN_BATCHES", 1)


def _read_only(result):
    """The shards' accumulators with read-only arrays, as Ray's object store returns them."""
    for acc in result.values():
        for array in [*vars(acc).values(), acc.histogram.counts]:
            if isinstance(array, np.ndarray):
                array.flags.writeable = False
    return result


class Sharded:
    """An executor that cuts work into `workers` chunks and runs them here, each task's inputs and
    result passed through pickle as Ray would, its arrays read-only (the sharded path without Ray)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.names = []

    def map(self, fn, items, *, shared=None, names=None):
        self.names = list(names or [])
        shared = pickle.loads(pickle.dumps(shared))
        return [_read_only(pickle.loads(pickle.dumps(fn(shared, pickle.loads(pickle.dumps(item)))))) for item in items]


def _batches(count: int = 7, seed: int = 3) -> list[dict[str, np.ndarray]]:
    """Batches of different sizes and lengths (as padded text gives), an outlier channel, an empty one."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        x = rng.standard_normal((1 + i % 3, 2 + (i * 5) % 7, 8)).astype(np.float32) * (1.0 + i)
        x[..., 3] *= 20
        out.append({"X": x})
    out.insert(2, {"X": np.zeros((0, 4, 8), np.float32)})
    return out


def _same(a: dict, b: dict) -> list[str]:
    return [name for name in a if not a[name].equals(b[name])]


def test_any_shard_count_gives_the_statistics_of_one_stream():
    model, _ = mlp()
    tensors = quantizable_inputs(model)
    stream = collect(model, _batches(), tensors, sample_rows=12, bins=64)
    assert stream["X"].sample.shape == (12, 8)
    for workers in (1, 2, 3, 5, 9):
        executor = Sharded(workers)
        sharded = collect(model, _batches(), tensors, sample_rows=12, bins=64, executor=executor)
        assert _same(stream, sharded) == [], workers
        assert len(executor.names) == (min(workers, 7) if workers > 1 else 0)  # one shard: this process
    assert executor.names[0] == "calibrate: batches 1-1 of 7" and executor.names[-1] == "calibrate: batches 7-7 of 7"


def test_shards_of_too_few_batches_run_in_this_process(monkeypatch):
    """Each shard's session costs more than a few batches: shards of at least SHARD_MIN_BATCHES, at
    most one a worker, and fewer than two such shards run here."""
    model, _ = mlp()
    tensors = quantizable_inputs(model)
    stream = collect(model, _batches(), tensors, sample_rows=12, bins=64)  # 7 batches with samples
    for least, names in ((4, []), (3, ["calibrate: batches 1-4 of 7", "calibrate: batches 5-7 of 7"])):
        monkeypatch.setattr(calibration, "SHARD_MIN_BATCHES", least)
        executor = Sharded(5)
        assert _same(stream, collect(model, _batches(), tensors, sample_rows=12, bins=64, executor=executor)) == []
        assert executor.names == names, least


def test_merged_accumulators_equal_one_stream_bit_for_bit():
    """Shards of very different ranges: the histogram widths differ and are merged to the widest,
    the sums are added batch by batch, the sample is the bottom-k of the parts'."""
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((3, 5, 6)) * scale for scale in (1e-3, 5.0, 0.2, 300.0, 0.0, 7.0)]
    stream = Accumulator(-1, sample_rows=9, bins=64)
    for i, x in enumerate(batches):
        stream.add(x, 3 * i, 3)
    for cut in ((1,), (2, 4), (1, 2, 3, 4, 5), (5,)):
        bounds = (0, *cut, len(batches))
        parts = []
        for k in range(len(bounds) - 1):
            acc = Accumulator(-1, sample_rows=9, bins=64, folds=k == 0)
            for i in range(bounds[k], bounds[k + 1]):
                acc.add(batches[i], 3 * i, 3)
            parts.append(acc)
        for later in parts[1:]:
            parts[0].merge(later)
        assert parts[0].finish().equals(stream.finish()), cut


def test_histogram_merge_is_the_histogram_of_both_value_sets():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(500) * 0.01, rng.standard_normal(300) * 40
    for first, second in ((a, b), (b, a), (np.zeros(7), a), (a, np.zeros(7))):
        whole, left, right = Histogram(64), Histogram(64), Histogram(64)
        whole.add(first)
        whole.add(second)
        left.add(first)
        right.add(second)
        left.merge(right)
        assert left == whole


def test_row_ids_number_samples_and_rows_within_them_in_data_order():
    """A row's id is (sample, row within it), known to a shard without the rows of earlier batches;
    ids are unique and increase in data order, also when rows do not divide among the samples."""
    ids = calibration._row_ids(6, 2, 10)  # samples 6 and 7, 5 rows each
    assert [(int(i) >> 32, int(i) & 0xFFFFFFFF) for i in ids[[0, 4, 5, 9]]] == [(6, 0), (6, 4), (7, 0), (7, 4)]
    odd = calibration._row_ids(8, 3, 7)  # 7 rows among 3 samples: all counted as sample 8's
    assert [int(i) >> 32 for i in odd] == [8] * 7 and list(np.diff(odd)) == [1] * 6
    keys = np.concatenate([calibration._row_keys(0, 2, 10)[0], calibration._row_keys(2, 3, 9)[0]])
    assert np.unique(keys).size == keys.size


def test_a_later_shard_must_keep_its_batch_sums():
    first, folded = Accumulator(-1), Accumulator(-1)
    first.add(np.ones((2, 3)))
    folded.add(np.ones((2, 3)))
    with pytest.raises(ValueError, match="folds=False"):
        first.merge(folded)


def test_the_shard_job_carries_the_graph_once_and_arrays_only():
    model, _ = mlp()
    tensors = quantizable_inputs(model)
    executor = Sharded(3)
    seen = {}

    def spy(fn, items, *, shared=None, names=None):
        seen["shared"], seen["items"] = shared, items
        return Sharded.map(executor, fn, items, shared=shared, names=names)

    executor.map = spy
    collect(model, _batches(), tensors, executor=executor, sample_rows=4)
    assert isinstance(seen["shared"], calibration.ShardJob) and isinstance(seen["shared"].model, bytes)
    for first, batches in seen["items"]:
        for index, first_sample, feeds in batches:
            assert all(isinstance(a, np.ndarray) for a in feeds.values())
