"""Block bookkeeping for the paged KV pool: free list, reference counts, per-sequence block tables.

Pure Python, no tensors: the pool tensors live in ``PagedKVCache``. A block is shared (refcount > 1) after
``fork``; appending into a shared, partly filled last block copies it first (copy-on-write), and the copy is
returned to the caller, who copies the K/V rows in the pool.
"""

from __future__ import annotations

import dataclasses


class OutOfBlocks(RuntimeError):
    """The pool has too few free blocks for the request; the scheduler preempts a sequence and retries."""


@dataclasses.dataclass
class BlockTable:
    """One sequence's blocks, in token order, and how many tokens they hold."""

    blocks: list[int] = dataclasses.field(default_factory=list)
    num_tokens: int = 0


class BlockAllocator:
    """``num_blocks`` blocks of ``block_size`` tokens; block ids index dim 0 of every layer's pool tensor."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"BlockAllocator: num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids are handed out first
        self.refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, table: BlockTable, new_tokens: int) -> int:
        """Free blocks that appending ``new_tokens`` to ``table`` takes, counting a copy-on-write of its tail."""
        total = table.num_tokens + new_tokens
        needed = -(-total // self.block_size) - len(table.blocks)
        if self._tail_is_shared(table) and new_tokens > 0:
            needed += 1
        return max(needed, 0)

    def _tail_is_shared(self, table: BlockTable) -> bool:
        partly_filled = table.num_tokens % self.block_size != 0
        return bool(table.blocks) and partly_filled and self.refcount[table.blocks[-1]] > 1

    def _take(self) -> int:
        if not self._free:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        block = self._free.pop()
        assert self.refcount[block] == 0, f"block {block} on the free list with refcount {self.refcount[block]}"
        self.refcount[block] = 1
        return block

    def _release(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise RuntimeError(f"BlockAllocator: block {block} freed more often than it was taken")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._free.append(block)

    def append(self, table: BlockTable, new_tokens: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Make room for ``new_tokens`` more tokens; return their slots and the (src, dst) block copies that
        copy-on-write needs. All or nothing: raises ``OutOfBlocks`` before changing anything."""
        if self.blocks_needed(table, new_tokens) > self.num_free:
            raise OutOfBlocks(f"need {self.blocks_needed(table, new_tokens)} KV blocks, {self.num_free} free")
        copies = []
        if new_tokens > 0 and self._tail_is_shared(table):
            src = table.blocks[-1]
            dst = self._take()
            self._release(src)
            table.blocks[-1] = dst
            copies.append((src, dst))
        first = table.num_tokens
        table.num_tokens += new_tokens
        while len(table.blocks) * self.block_size < table.num_tokens:
            table.blocks.append(self._take())
        bs = self.block_size
        slots = [table.blocks[t // bs] * bs + t % bs for t in range(first, table.num_tokens)]
        return slots, copies

    def fork(self, table: BlockTable) -> BlockTable:
        """A second sequence sharing every block of ``table`` (e.g. the same prompt sampled twice)."""
        for block in table.blocks:
            self.refcount[block] += 1
        return BlockTable(list(table.blocks), table.num_tokens)

    def share_prefix(self, table: BlockTable, num_blocks: int) -> BlockTable:
        """A new table starting with the first ``num_blocks`` (full) blocks of ``table``, shared: a second request
        with the same prompt prefix reuses its K/V instead of recomputing and storing it again."""
        if num_blocks * self.block_size > table.num_tokens:
            raise ValueError(f"share_prefix: {num_blocks} blocks are more than the {table.num_tokens} tokens held")
        for block in table.blocks[:num_blocks]:
            self.refcount[block] += 1
        return BlockTable(table.blocks[:num_blocks], num_blocks * self.block_size)

    def free(self, table: BlockTable) -> None:
        """Give back a finished or preempted sequence's blocks (shared ones stay with their other owners)."""
        for block in table.blocks:
            self._release(block)
        table.blocks.clear()
        table.num_tokens = 0

    def check(self, tables: list[BlockTable]) -> None:
        """Assert the invariants the tests hold the allocator to, given every live table."""
        counts = [0] * self.num_blocks
        for table in tables:
            assert len(table.blocks) == -(-table.num_tokens // self.block_size), "table size != its token count"
            assert len(set(table.blocks)) == len(table.blocks), "a block appears twice in one table"
            for block in table.blocks:
                counts[block] += 1
        assert counts == self.refcount, "reference counts disagree with the live tables"
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert free == {b for b in range(self.num_blocks) if counts[b] == 0}, "free list != unreferenced blocks"
