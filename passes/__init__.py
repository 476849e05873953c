"""Compiler passes, one module and one class per pass; importing this package registers them."""

from qcompiler.passes import calibrate  # noqa: F401
from qcompiler.passes import canonicalize  # noqa: F401
from qcompiler.passes import equalize  # noqa: F401
from qcompiler.passes import fold_scales  # noqa: F401
from qcompiler.passes import lower_ort  # noqa: F401
from qcompiler.passes import quantize  # noqa: F401
from qcompiler.passes import smooth  # noqa: F401
from qcompiler.passes import awq_scale  # noqa: F401
from qcompiler.passes import allocate_bits  # noqa: F401
from qcompiler.passes import quantize_weights  # noqa: F401
from qcompiler.passes import fold_permutation  # noqa: F401
from qcompiler.passes import fuse  # noqa: F401
from qcompiler.passes import flexround  # noqa: F401
from qcompiler.passes import tune_scales  # noqa: F401
from qcompiler.passes import prune_channels  # noqa: F401
from qcompiler.passes import gptq  # noqa: F401
from qcompiler.passes import kv_cache  # noqa: F401
from qcompiler.passes import quantize_embedding  # noqa: F401
