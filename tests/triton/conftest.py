"""Triton kernel tests run on the CPU through Triton's interpreter: the variable must be set before
triton is first imported (the repository's root conftest sets it too)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
