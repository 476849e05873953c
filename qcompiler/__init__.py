"""qcompiler: a graph-level quantization compiler.

    import qcompiler
    model = qcompiler.capture(module, {"x": x}, {"x": {0: "batch"}})   # torch -> IR
    model = qcompiler.load("model.onnx")                               # ONNX file -> IR
    result = qcompiler.compile("minilm-l6", "build/minilm", pipeline="default", dump_ir="build/ir")
"""

from qcompiler.driver.capture import capture
from qcompiler.driver.compiler import CompileResult, compile
from qcompiler.errors import QCompilerError, UserError
from qcompiler.ir import load, parse, save, to_text, verify
from qcompiler.pipeline.spec import format_pipeline, parse_pipeline

__all__ = [
    "CompileResult",
    "QCompilerError",
    "UserError",
    "capture",
    "compile",
    "format_pipeline",
    "load",
    "parse",
    "parse_pipeline",
    "save",
    "to_text",
    "verify",
]
