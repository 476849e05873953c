"""What `lower-ort` asks of the host CPU: its architecture, VNNI, and the MatMulNBits compute type
that is fast on it."""

from __future__ import annotations

import functools
import platform


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI int8 dot products (Linux /proc/cpuinfo flags)."""
    if not is_x86():
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


@functools.cache
def nbits_accuracy_level() -> int:
    """MatMulNBits' accuracy_level for this CPU: 4 (int8 compute) where ONNX Runtime has fast int8
    kernels for it (x86 with AVX2 or AVX-512, 64-bit Arm); measured on a 2-core AVX-512 VNNI Xeon at
    M=1, 4096x4096, 4-bit g128: 0.47 ms against 1.86 ms with 0 (float compute). 0 elsewhere."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return 4
    if not is_x86():
        return 0
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return 4  # every x86-64 CPU ONNX Runtime ships for since 2013 has AVX2
    return 4 if " avx2" in flags or "avx512" in flags else 0


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def signed_activations_are_faster() -> bool:
    """ONNX Runtime's x86 int8 kernels take unsigned activations (U8S8); signed ones are
    converted first. Measured here (benchmarks/w8a8_peers.py, Xeon with AVX-512 VNNI, 2 threads):
    MiniLM at 0.70x of float32 latency with u8 against 0.86x with s8; SmolLM2 0.52x against 1.03x.
    Without VNNI the gap is reported larger still. Arm's kernels prefer signed (S8S8)."""
    return not is_x86()
