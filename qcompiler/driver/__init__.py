"""From a source to an artifact: capture (every way a model enters), the compile options (declared
once), the session `compile`, `doctor` and `opt` run through, `compile`, and where outputs may be
written."""
