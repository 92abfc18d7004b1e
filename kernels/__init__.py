"""Quantized-weight formats: the block types the converters write and the per-tensor type policy."""
