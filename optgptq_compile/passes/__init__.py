"""The pass pipeline: each pass is ``fn(gm, ctx) -> changed`` in a file of its own, run in the order of ``PASSES``.

Order matters: attention is matched before the linear pass (head merging rewrites K/V projection weights, which
must happen before they are quantized), the paged-KV rewrite runs on the matched attention ops (and the RoPE fold
on the KV writes it leaves, then the fold of each rope_kv_write into the paged_attention reading its rotated query,
which needs the ops of both), and sibling projections are fused only once they are gptq_linear calls; the norm /
residual fold runs on the fused calls (one norm then feeds one q/k/v call, not three), and the silu * up fold after
it, on the fused gate/up call (whose norm it keeps; its halves exist as one call's columns only after
fuse_projections). The outer-product matmul rewrite (the rotary embedding's [B, D/2, 1] @ [B, 1, S]) needs nothing
from the others but runs last, so that no pattern an earlier pass matches loses its matmul: BLOOM's probabilities
@ V ``bmm`` contracts over the keys, one key for a one-token prompt, and match_attention must still see it.
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from ..context import PassContext
from .calibrate_gptq import calibrate_gptq
from .convert_gqa import convert_gqa
from .fuse_norm_residual import fuse_norm_residual
from .fuse_projections import fuse_projections
from .fuse_rope_attention import fuse_rope_attention
from .fuse_rope_kv_write import fuse_rope_kv_write
from .fuse_silu_mul import fuse_silu_mul
from .match_attention import match_attention
from .outer_product_matmul import outer_product_matmul
from .paged_kv import paged_kv
from .quantize_linear import quantize_linear

Pass = Callable[[fx.GraphModule, PassContext], bool]

PASSES: list[Pass] = [
    match_attention,
    convert_gqa,
    paged_kv,
    fuse_rope_kv_write,
    fuse_rope_attention,
    calibrate_gptq,
    quantize_linear,
    fuse_projections,
    fuse_norm_residual,
    fuse_silu_mul,
    outer_product_matmul,
]
