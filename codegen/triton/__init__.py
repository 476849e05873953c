"""Triton kernel families for quantized linears (specialised at emit time)."""
