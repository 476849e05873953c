"""What users run: the command line and its build-step interface, `eval`, `generate`, `doctor`, `opt`,
and the report."""
