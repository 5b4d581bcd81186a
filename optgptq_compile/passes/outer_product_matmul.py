"""Rewrite a matmul whose contracted dimension is statically 1 into the broadcast product it equals: ``a * b``.

Why: HF's rotary embedding in transformers 5.17 (what the H100 runs; 5.23 and 5.24 multiply instead) computes
``freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)``, [B, D/2, 1] @ [B, 1, S].
On the GPU that matmul is a cuBLAS sgemm (3.6 us) and two copies around it at the start of every decode step,
and as an extern kernel it keeps Inductor from fusing the cos/sin that follow into one pointwise kernel. With one
contracted element, ``out[..., i, j] = a[..., i, 0] * b[..., 0, j]``: one product, one rounding (a GEMM with
K = 1 adds it to zero), so ``torch.mul(a, b)`` is the same result bit for bit (the tests check fp32, fp16, bf16
and fp64 on the CPU). Not so with TF32 matmuls allowed: the sgemm then rounds its inputs to TF32 first, and the
product is the more exact of the two.

Matched form (Dynamo's torch-level graph; it records 5.17's rotary ``@`` as ``operator.matmul``)::

    out = a @ b | torch.matmul(a, b) | torch.bmm(a, b) | torch.mm(a, b) | a.matmul(b) | a.bmm(b) | a.mm(b)
          (and aten's matmul / bmm / mm)     a: [..., M, 1], b: [..., 1, N], out: [..., M, N]

where the 1 is static in the example values, a and b share out's floating dtype, and the broadcast of a's and b's
shapes provably is out's shape (the batch dims broadcast as they do for the matmul; a symbolic dim only matches
the same symbol). It becomes ``out = torch.mul(a, b)``. Not candidates: a contracted size other than 1, unknown
or symbolic. Left alone, with the reason in the report: a 1-D operand (matmul drops the vector's dim: a dot or
matrix-vector product, not an outer product), a result dtype other than the operands' (an autocast region casts
the matmul, not the product), keyword arguments such as ``out=``, and shapes not provably equal.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..context import PassContext
from .utils import finish_pass, replace_node
from .utils import node_value as _val

NAME = "outer_product_matmul"

_aten = torch.ops.aten
_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.mm, _aten.matmul.default, _aten.bmm.default,
              _aten.mm.default}
_METHODS = {"matmul", "bmm", "mm", "__matmul__"}
_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}  # what the bit-for-bit argument covers


def _is_matmul(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _METHODS
    return node.op == "call_function" and node.target in _FUNCTIONS


def _dim(size):
    """A size as something compared without guards: an int if static, the SymInt's expression, or None."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        static = size.node.maybe_as_int()  # structural: never adds a guard to Dynamo's shape env
        return static if static is not None else size.node.expr
    return None


def _contracted(a: torch.Tensor, b: torch.Tensor):
    """The size matmul contracts, if a's last dim and b's second to last (its only one if 1-D) agree on it."""
    if a.dim() == 0 or b.dim() == 0:
        return None
    k = _dim(a.shape[-1])
    return k if k == _dim(b.shape[-2 if b.dim() >= 2 else 0]) else None


def _broadcast(xs, ys) -> list | None:
    """The elementwise broadcast of two shapes (as ``_dim`` keys), or None where it is not provable."""
    n = max(len(xs), len(ys))
    xs = [1] * (n - len(xs)) + [_dim(x) for x in xs]
    ys = [1] * (n - len(ys)) + [_dim(y) for y in ys]
    out = []
    for x, y in zip(xs, ys):
        if x is None or y is None:
            return None
        if x == 1 or x == y:  # int or sympy expression: equality is structural, no guard
            out.append(y)
        elif y == 1:
            out.append(x)
        else:
            return None  # two different symbols (or sizes): equal only under a guard we do not have
    return out


def _why_not(node: fx.Node, av: torch.Tensor, bv: torch.Tensor) -> str | None:
    """Why the matmul ``node`` (contracted size 1) cannot become ``a * b``, or None if it can."""
    if av.dim() < 2 or bv.dim() < 2:
        return (f"a 1-D operand ({list(av.shape)} @ {list(bv.shape)}): matmul contracts the vector away (a dot or "
                "matrix-vector product), a product would keep its dim")
    if node.kwargs:
        return f"keyword arguments {sorted(node.kwargs)}"
    out = _val(node)
    if out is None:
        return "no example value of the matmul's result to check the product against"
    if not (av.dtype == bv.dtype == out.dtype) or out.dtype not in _FLOATS:
        return (f"dtypes {av.dtype} @ {bv.dtype} -> {out.dtype}: not one floating dtype throughout (an autocast "
                "region casts the matmul, not a product)")
    shape = _broadcast(av.shape, bv.shape)
    if shape is None or shape != [_dim(s) for s in out.shape]:
        return f"the product's broadcast shape is not provably the matmul's {list(out.shape)}"
    return None


def outer_product_matmul(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """Rewrite each matmul with a static contracted size of 1 ([..., M, 1] @ [..., 1, N]) into ``torch.mul(a, b)``."""
    changed = False
    for node in [n for n in gm.graph.nodes if _is_matmul(n)]:
        if len(node.args) != 2:
            continue  # operands by keyword: not a form Dynamo records for ``@`` or torch.matmul
        a, b = node.args
        av, bv = _val(a), _val(b)
        if av is None or bv is None or _contracted(av, bv) != 1:
            continue  # a real contraction (attention, projections) or unknown shapes: not a candidate
        reason = _why_not(node, av, bv)
        if reason:
            ctx.skipped(NAME, node, f"matmul with one contracted element kept: {reason}")
            continue
        with gm.graph.inserting_before(node):
            product = gm.graph.call_function(torch.mul, (a, b))
        replace_node(node, product)  # same shape, dtype and values: the example value carries over as it is
        ctx.matched(NAME, node, f"{list(av.shape)} @ {list(bv.shape)} as a broadcast product ({product.name})",
                    counter="outer_product_matmuls")
        gm.graph.erase_node(node)
        changed = True
    if changed:
        finish_pass(gm, NAME)
    return changed
