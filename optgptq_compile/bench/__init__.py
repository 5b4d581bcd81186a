"""Benchmarks that ship with the package (``optgptq bench ...``): the end-to-end decode benchmark and its int4
tinygemm baseline. Per-kernel scripts live in the repository's ``benchmarks/``."""
