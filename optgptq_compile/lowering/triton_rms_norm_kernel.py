"""``rms_norm_kernel``: HF ``LlamaRMSNorm`` of each row, for ``optgptq::gptq_linear_fused_triton`` at M > 1
(launcher ``rms_norm`` in ``triton_gptq_linear.py``, reference ``gptq_linear.torch_rms_norm``). Nothing but
``@triton.jit`` functions here.

The M = 1 gemv folds the norm into its K loop; the decode-batch and prefill kernels take a normalized x. aten's
``F.rms_norm`` (``vectorized_layer_norm_kernel``) took 5.9 us for 8 x 4096 fp16 rows on the H100 (session 9
profile), where Inductor's own add + norm kernel took 1.8 us: this kernel is one program per row, two passes over
the row in BLOCK chunks (sum of squares, then scale; at hidden size <= BLOCK the second pass hits L1/L2).
"""

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(
    x_ptr,  # [M, K], rows stride_xm apart, last dim contiguous
    w_ptr,  # [K], x's dtype
    out_ptr,  # [M, K] contiguous, x's dtype
    K, stride_xm, eps,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[m] = w * (x[m] * rsqrt(mean(x[m]**2) + eps)).to(x.dtype), statistics in fp32 as HF computes them."""
    if PDL:  # programmatic dependent launch (triton_utils.pdl): let the next kernel start, wait for the last one
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    out_row = out_ptr + row * K
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        ss += x * x
    inv_rms = tl.rsqrt(tl.sum(ss, axis=0) / K + tl.cast(eps, tl.float32))  # eps: fp64 from Inductor's launcher
    for k0 in range(0, K, BLOCK):
        mask = k0 + cols < K
        x = tl.load(x_row + k0 + cols, mask=mask, other=0.0)
        w = tl.load(w_ptr + k0 + cols, mask=mask, other=0.0)
        h = (x.to(tl.float32) * inv_rms).to(x.dtype)  # HF rounds the normalized x to the activation dtype, then
        # scales by w: a product of two 16-bit floats is exact in fp32, so one rounding gives the 16-bit product
        tl.store(out_row + k0 + cols, (w.to(tl.float32) * h.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)
