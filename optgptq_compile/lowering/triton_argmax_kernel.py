"""``argmax_rows_kernel``: the greedy token of each row of logits (launcher and reference: ``triton_argmax.py``).
Nothing but ``@triton.jit`` functions here.

One program per row, BLOCK values per pass held across the program's lanes (16 warps: 32 values a lane at
BLOCK = 16384), so every load of a pass is in flight at once and a 32000-entry row takes two L2 round trips. aten's
argmax (``reduce_kernel<512, 1>``) walks a row a few values per thread at a time: 11 us per decode step for 32000
fp16 logits on the H100 (session 14 profile), against a bandwidth floor well under 1 us.
"""

import triton
import triton.language as tl


@triton.jit
def argmax_rows_kernel(
    x_ptr,  # [B, V], rows stride_x apart, last dim contiguous
    out_ptr,  # int64 [B]
    V, stride_x,
    BLOCK: tl.constexpr,
):
    """out[b] = the first index of the largest value of row b, NaN counting as larger than any number (as
    ``torch.argmax`` counts it); a row of -inf gives 0."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    # per lane: the best value seen and its index; the first pass seeds them, so a row of -inf keeps index 0
    best = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)  # [BLOCK]
    best = tl.where(best != best, float("inf"), best)  # NaN ranks first (an inf in the same row ties with it)
    best_i = cols
    for v0 in range(BLOCK, V, BLOCK):
        x = tl.load(x_row + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("inf"), x)
        better = x > best  # strictly: a lane keeps its earlier index on a tie
        best = tl.where(better, x, best)
        best_i = tl.where(better, v0 + cols, best_i)
    top = tl.max(best, axis=0)
    first = tl.min(tl.where(best == top, best_i, 2147483647), axis=0)  # the smallest index holding the maximum
    tl.store(out_ptr + row, first.to(tl.int64))
