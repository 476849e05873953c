"""Pass infrastructure: the pass base and registry (`passbase`), pipeline strings and presets
(`spec`), the pass manager, its instruments, and the context a run carries."""
