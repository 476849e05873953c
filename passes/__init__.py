"""Compiler passes, one module and one class per pass; importing this package registers them."""

from qcompiler.passes import canonicalize  # noqa: F401
