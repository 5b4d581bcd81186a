"""Move the decode GEMV's split-K reduction out of the kernel and into the graph, where Inductor fuses it.

At M = 1 the Triton gemv splits K over several programs to keep HBM busy; in the kernel the last program of each
column tile reloads the others' fp32 partial sums and adds them -- an atomic, a reload and a store in series at
the end of every call (about 2 us of an 11008x4096 GEMV on the H100, benchmarks/gemv_probe.py ``memw_nored``). In
a compiled graph the GEMV's output always feeds an Inductor kernel (RoPE, SiLU * up, the residual add and the next
RMSNorm), so this pass rewrites

    y = gptq_linear(x, W..., bias)            # x [..., K] with one row
into
    p = gptq_linear_partials(x, W..., split_len)   # fp32 [S, ..., N]: one partial sum per K slice, not reduced
    y = (p.sum(0) + bias).to(x.dtype)

and Inductor reads the S partial rows (from L2) inside the consumer's kernel. ``split_len`` is the launcher's own
K split for that shape (``gemv_split_len``), so the kernel's grid and tiles are what the gemv would have run.

Option ``split_k_epilogue`` (default on) turns it off. Only where it pays and is exact: Triton kernels selected (``lowering.use_triton``), a static single row (decode at
batch 1; symbolic batch sizes keep the in-kernel reduce), 2/4/8 bits, a ``g_idx`` that is plain ``k //
group_size`` (act-order weights keep ``gptq_linear``, whose kernel selection sorts them), and a shape the launcher
splits. The sum's order differs from the kernel's (split order either way, fp32), so results agree to fp32
rounding, not bit for bit.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from .. import stats
from ..context import PassContext
from ..log import log
from .utils import finish_pass

NAME = "split_k_epilogue"
GPTQ = torch.ops.optgptq.gptq_linear.default
PARTIALS = torch.ops.optgptq.gptq_linear_partials.default


def _val(node):
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None


def _single_row(x) -> bool:
    """x [..., K] has exactly one row, known at compile time (no symbolic sizes)."""
    val = _val(x)
    return val is not None and all(isinstance(d, int) for d in val.shape) and math.prod(val.shape[:-1]) == 1


def _plain_g_idx(gm: fx.GraphModule, node, k: int, group_size: int) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    g_idx = operator.attrgetter(node.target)(gm)
    size = k if group_size == -1 else group_size
    return bool(torch.equal(g_idx.cpu(), torch.arange(k, dtype=g_idx.dtype) // size))


def split_k_epilogue(gm: fx.GraphModule, ctx: PassContext) -> bool:
    from ..lowering import TRITON_IMPORT_ERROR, use_triton

    if not ctx.config.split_k_epilogue or TRITON_IMPORT_ERROR is not None or not use_triton(ctx):
        return False
    from ..lowering.triton_gptq_linear import gemv_split_len
    from ..lowering.triton_utils import num_sms

    device = ctx.device()
    sms = num_sms(device.index or 0 if device.type == "cuda" else 0)
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != GPTQ:
            continue
        x, qweight, qzeros, scales, g_idx, bias, bits, group_size = node.args
        scales_val = _val(scales)
        if scales_val is None or bits == 3 or not _single_row(x):
            continue
        k, n = _val(x).shape[-1], scales_val.shape[-1]
        if not _plain_g_idx(gm, g_idx, k, group_size):
            continue
        split_len = gemv_split_len(n, k, bits, group_size, sms)
        if split_len is None:
            continue
        with gm.graph.inserting_before(node):
            part = gm.graph.call_function(PARTIALS, (x, qweight, qzeros, scales, g_idx, bits, group_size, split_len))
            y = gm.graph.call_function(torch.ops.aten.sum.dim_IntList, (part, [0]))
            if bias is not None:
                y = gm.graph.call_function(torch.ops.aten.add.Tensor, (y, bias))
            y = gm.graph.call_function(torch.ops.prims.convert_element_type.default, (y, _val(x).dtype))
        if "val" in node.meta or "example_value" in node.meta:
            y.meta["val"] = _val(node)
        ctx.matched(NAME, node, f"x [1, {k}] -> [{n}]: {-(-k // split_len)} K splits of {split_len}, summed by the "
                    "consumer")
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        stats.bump("split_k_epilogues", rewritten)
        log.info("optgptq: %d decode GEMV(s) reduce their K splits in the consumer's kernel", rewritten)
        finish_pass(gm, NAME)
    return rewritten > 0
