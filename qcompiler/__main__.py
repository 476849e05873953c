"""`python -m qcompiler ...` is the `qcompiler` command."""

from qcompiler.tools.cli import entry

entry()
