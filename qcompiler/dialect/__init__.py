"""The `qc` op dialect: the op registry and the op families (uniform, mixed precision, fused, int8 KV cache),
each op with its schema, verifier and numpy reference. `ops` imports every family, which registers it."""
