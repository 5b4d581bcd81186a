"""Cases for the greedy-token argmax kernel in the Triton interpreter (CPU) against ``torch.argmax``. Collected by
test_triton_argmax.py in a process started with TRITON_INTERPRET=1."""

import pytest
import torch

from optgptq_compile.lowering import triton_argmax as T


def _logits(b, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, v, generator=g) * 4).to(dtype)


@pytest.mark.parametrize("b,v,block", [
    (3, 1, None),  # one entry
    (2, 7, None),  # fewer entries than a pass: masked lanes must never win
    (2, 64, 64),  # exactly one pass
    (2, 65, 64),  # one entry past a pass: the second pass is one value
    (4, 1000, 128),  # several passes, ragged last
    (1, 32000, None),  # Llama's vocabulary: two passes of 16384
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_matches_torch(monkeypatch, b, v, block, dtype):
    if block is not None:
        monkeypatch.setattr(T, "BLOCK", block)
    x = _logits(b, v, dtype, seed=v)
    assert torch.equal(T.argmax_rows(x), T.torch_argmax_rows(x))


def test_ties_take_the_first_index_across_lanes_and_passes(monkeypatch):
    monkeypatch.setattr(T, "BLOCK", 64)
    x = _logits(4, 300, torch.float16, seed=1)
    top = x.max() + 1
    x[0, [5, 70, 200]] = top  # same lane offset in different passes: the first pass wins
    x[1, [130, 3]] = top  # the later pass holds the larger index; a lower lane of the first pass wins
    x[2, [66, 65]] = top  # neighbouring lanes of one pass
    x[3, [299, 64]] = top  # the last, masked-off pass and the start of the second
    assert T.argmax_rows(x).tolist() == [5, 3, 65, 64]
    assert torch.equal(T.argmax_rows(x), T.torch_argmax_rows(x))


def test_infinities_and_nan_as_torch_ranks_them():
    x = _logits(4, 50, torch.float32, seed=2)
    x[0] = float("-inf")  # nothing finite: index 0
    x[1, 17] = float("inf")
    x[2, 9] = float("nan")  # NaN ranks above every number
    x[3, [4, 30]] = float("nan")  # the first NaN
    assert T.argmax_rows(x).tolist() == torch.argmax(x, -1).tolist() == [0, 17, 9, 4]


def test_strided_rows_and_bad_shapes():
    full = _logits(3, 2, torch.float16, seed=3).new_empty(0)
    wide = _logits(2, 5 * 96, torch.bfloat16, seed=3).view(2, 5, 96)
    last = wide[:, -1]  # [2, 96], rows 480 apart: the decode step's last-position logits
    assert torch.equal(T.argmax_rows(last), torch.argmax(last, -1))
    assert T.argmax_rows(_logits(0, 10, torch.float16)).shape == (0,)
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        T.argmax_rows(full)
    with pytest.raises(ValueError, match="empty vocabulary"):
        T.argmax_rows(torch.zeros(2, 0))
