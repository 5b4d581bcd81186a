"""Real and fake outputs of the attention ops must have the same strides: Inductor asserts them at run time.

HF hands the ops transposed views ([B, S, H, D] memory seen as [B, H, S, D]); a fake built with
``empty_like(q)`` copied those strides while the reference returned a contiguous tensor (caught on the H100).
"""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import optgptq_compile  # noqa: F401


def _real_and_fake(op, *args):
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fake_args)
    return real, fake


def test_attention_output_strides_match_fake_for_transposed_query():
    q = torch.randn(2, 5, 4, 16).transpose(1, 2)  # [B, Hq, Sq, D] view of [B, Sq, Hq, D] memory
    k = torch.randn(2, 5, 2, 16).transpose(1, 2)
    v = torch.randn(2, 5, 2, 16).transpose(1, 2)
    real, fake = _real_and_fake(torch.ops.optgptq.attention.default, q, k, v, None, None, True, 0.25)
    assert real.stride() == fake.stride() == real.contiguous().stride()


def test_paged_attention_output_strides_match_fake_for_transposed_query():
    q = torch.randn(2, 1, 4, 16).transpose(1, 2)  # decode: [B, Hq, 1, D]
    k_cache = torch.randn(6, 4, 2, 16)  # [num_blocks, block_size, Hkv, D]
    v_cache = torch.randn(6, 4, 2, 16)
    tables = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    lens = torch.tensor([9, 5], dtype=torch.int32)
    real, fake = _real_and_fake(torch.ops.optgptq.paged_attention.default, q, k_cache, v_cache, tables, lens, None,
                                True, 0.25)
    assert real.stride() == fake.stride() == real.contiguous().stride()
