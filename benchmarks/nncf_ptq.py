"""NNCF post-training int8 quantization of an ONNX model, run in the interpreter that has NNCF
(`.venv-peers`, see `benchmarks/peers.py`); `benchmarks/imaging.py` and `benchmarks/equalize.py`
call it as a child process so that qcompiler itself never imports NNCF.

    .venv-peers/bin/python benchmarks/nncf_ptq.py FLOAT.onnx BATCHES.npz OUT.onnx [--model-type cnn]

BATCHES.npz holds the calibration batches as arrays named `<batch index>/<input name>`. NNCF's
`quantize` runs with its defaults for a conv net (preset PERFORMANCE: symmetric int8 activations and
weights, per-channel weights, min-max ranges with its own outlier handling, fast bias correction),
on every calibration sample (`subset_size`). Prints one JSON line: NNCF's version, the settings and
the seconds it took.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time


def load_batches(path: str) -> list[dict]:
    import numpy as np

    data = np.load(path)
    batches: dict[int, dict] = {}
    for key in data.files:
        index, _, name = key.partition("/")
        batches.setdefault(int(index), {})[name] = data[key]
    return [batches[i] for i in sorted(batches)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("batches")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    import nncf
    import onnx

    batches = load_batches(args.batches)
    samples = sum(len(next(iter(b.values()))) for b in batches)
    model = onnx.load(args.model)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=samples)
    onnx.save(quantized, args.out)
    print(json.dumps({"nncf": nncf.__version__, "config": f"nncf.quantize(subset_size={samples}), defaults (preset PERFORMANCE)",
                      "compile_s": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
