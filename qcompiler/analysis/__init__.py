"""What passes measure and compute on a model: calibration and its data, statistics cache and
block-sequential runs, execution in ONNX Runtime and torch, blocks, channels, bit costs, probes,
integer-kernel placement and block-wise reconstruction."""
