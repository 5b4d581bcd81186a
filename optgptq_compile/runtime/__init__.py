"""The paged-KV runtime.

- ``block_allocator``: free list, reference counts, block tables, copy-on-write, shared prefixes;
- ``paged_cache``: ``PagedKVCache``, a transformers ``Cache`` over the block pool (also usable in HF ``generate``);
- ``scheduler``: ``Engine``, continuous batching with preemption by recompute;
- ``sampling``: greedy / temperature / top-k / top-p with per-request seeds;
- ``cuda_graphs``: decode steps replayed as CUDA graphs per padded batch size;
- ``memory``: pool sizing from a budget and KV memory accounting;
- ``generate``: ``optgptq_compile.generate`` and ``generate_stream``.
"""
