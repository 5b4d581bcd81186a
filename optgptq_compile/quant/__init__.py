"""Weight quantization: the HF GPTQ tensor format and packing, round-to-nearest, the per-parameter cache."""
