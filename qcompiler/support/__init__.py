"""Small services every layer uses: whole-or-nothing file output, fan-out of independent work,
progress lines."""
