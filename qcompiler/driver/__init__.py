"""From a source to an artifact: capture (every way a model enters), `compile`, where outputs may be
written, and what a causal LM artifact carries."""
