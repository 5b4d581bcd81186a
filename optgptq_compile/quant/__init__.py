"""Weight quantization: GPTQ (gptq, sequential, api), the HF GPTQ tensor format, packing and checkpoints,
round-to-nearest, ``GPTQLinear``, the per-parameter cache."""
