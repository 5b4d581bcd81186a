"""BlockAllocator under long random workloads: no block used twice, no leaks, tables consistent, and a simulated
pool whose contents each sequence reads back intact (this catches a missed copy-on-write or a shared overwrite)."""

import random

import pytest

from optgptq_compile.runtime.block_allocator import BlockAllocator, BlockTable, OutOfBlocks


def _write(pool, alloc, table, slots, copies, tokens):
    """Apply copy-on-write copies, then store the new token values at their slots (what kv_write does)."""
    bs = alloc.block_size
    for src, dst in copies:
        for off in range(bs):
            pool[dst * bs + off] = pool.get(src * bs + off)
    for slot, tok in zip(slots, tokens):
        pool[slot] = tok


def _read(pool, alloc, table):
    bs = alloc.block_size
    return [pool.get(table.blocks[t // bs] * bs + t % bs) for t in range(table.num_tokens)]


@pytest.mark.parametrize("num_blocks,block_size,seed", [(64, 4, 0), (17, 16, 1), (200, 1, 2)])  # 1: a block a token
def test_random_workload_keeps_invariants(num_blocks, block_size, seed):
    rng = random.Random(seed)
    alloc = BlockAllocator(num_blocks, block_size)
    pool: dict[int, tuple] = {}
    live: dict[int, tuple[BlockTable, list]] = {}  # seq id -> (table, the tokens it must read back)
    next_id, out_of_blocks = 0, 0
    for step in range(3000):
        op = rng.random()
        if op < 0.25 or not live:  # a new sequence with a prompt of 0..40 tokens
            table, n = BlockTable(), rng.randint(0, 40)
            tokens = [(next_id, i) for i in range(n)]
            try:
                slots, copies = alloc.append(table, n)
            except OutOfBlocks:
                out_of_blocks += 1
                assert table.num_tokens == 0 and not table.blocks  # all or nothing
                continue
            _write(pool, alloc, table, slots, copies, tokens)
            live[next_id] = (table, tokens)
            next_id += 1
        elif op < 0.65:  # decode-like appends of 1..5 tokens
            sid = rng.choice(list(live))
            table, tokens = live[sid]
            n = rng.randint(1, 5)
            before = (list(table.blocks), table.num_tokens)
            try:
                slots, copies = alloc.append(table, n)
            except OutOfBlocks:
                out_of_blocks += 1
                assert (table.blocks, table.num_tokens) == before
                continue
            new = [(sid, step, i) for i in range(n)]
            _write(pool, alloc, table, slots, copies, new)
            tokens.extend(new)
        elif op < 0.75:  # fork (the same sequence continued twice)
            sid = rng.choice(list(live))
            table, tokens = live[sid]
            live[next_id] = (alloc.fork(table), list(tokens))
            next_id += 1
        elif op < 0.8:  # a new request reusing another's full prompt blocks
            sid = rng.choice(list(live))
            table, tokens = live[sid]
            n = rng.randint(0, table.num_tokens // block_size)
            live[next_id] = (alloc.share_prefix(table, n), list(tokens[: n * block_size]))
            next_id += 1
        else:
            sid = rng.choice(list(live))
            alloc.free(live.pop(sid)[0])
        alloc.check([t for t, _ in live.values()])
        if step % 50 == 0:
            for table, tokens in live.values():
                assert _read(pool, alloc, table) == tokens
    for table, tokens in live.values():
        assert _read(pool, alloc, table) == tokens
    for table, _ in live.values():
        alloc.free(table)
    assert alloc.num_free == num_blocks and all(c == 0 for c in alloc.refcount)  # no leaks
    assert out_of_blocks > 0  # the workload did push the pool to its limit


def test_copy_on_write_only_for_a_shared_partial_tail():
    alloc = BlockAllocator(8, 4)
    a = BlockTable()
    alloc.append(a, 6)  # blocks [0, 1], the second half full
    b = alloc.fork(a)
    assert alloc.blocks_needed(b, 1) == 1  # the copy of the shared tail
    slots, copies = alloc.append(b, 1)
    assert copies == [(a.blocks[1], b.blocks[1])] and b.blocks[0] == a.blocks[0] and b.blocks[1] != a.blocks[1]
    assert slots == [b.blocks[1] * 4 + 2]
    assert alloc.refcount[a.blocks[0]] == 2 and alloc.refcount[a.blocks[1]] == 1
    c, d = BlockTable(), None
    alloc.append(c, 8)  # two full blocks: a fork appends into a fresh block, nothing to copy
    d = alloc.fork(c)
    slots, copies = alloc.append(d, 1)
    assert copies == [] and len(d.blocks) == 3


def test_bad_sizes_and_double_free():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0, 16)
    alloc = BlockAllocator(2, 2)
    t = BlockTable()
    alloc.append(t, 3)
    stale = BlockTable(list(t.blocks), 3)
    alloc.free(t)
    with pytest.raises(RuntimeError, match="freed more often"):
        alloc.free(stale)
