"""The paged-KV runtime: block allocator, paged cache, scheduler (see issue: paged-KV runtime)."""
