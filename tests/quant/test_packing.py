"""Bit packing against hand-worked words, and round trips for every width."""

import pytest
import torch

from optgptq_compile.quant.packing import pack_cols, pack_rows, unpack_cols, unpack_rows


def _hex_words(packed: torch.Tensor) -> list[str]:
    return [f"{w & 0xFFFFFFFF:08x}" for w in packed.flatten().tolist()]


def test_4bit_hand_worked():
    # values 0..7 down K in one column: value j sits in bits [4j, 4j+4) -> nibbles read backwards
    assert _hex_words(pack_rows(torch.arange(8).reshape(8, 1), 4)) == ["76543210"]
    # 15 in the top nibble makes the int32 negative: the format stores raw bits in a signed word
    v = torch.zeros(8, 1, dtype=torch.long)
    v[7] = 15
    assert pack_rows(v, 4).item() == -(2**28)


def test_2bit_and_8bit_hand_worked():
    assert _hex_words(pack_rows(torch.tensor([[3], [0], [1], [2]] + [[0]] * 12), 2)) == ["00000093"]
    assert _hex_words(pack_rows(torch.tensor([[0x12], [0x34], [0x56], [0x78]]), 8)) == ["78563412"]


def test_3bit_value_straddles_two_words():
    # 32 values x 3 bits = 3 words. Value 10 starts at bit 30: its low 2 bits end word 0, its high bit opens word 1.
    v = torch.zeros(32, 1, dtype=torch.long)
    v[10] = 5  # 0b101: bit 0 -> word 0 bit 30, bit 1 (=0) -> word 0 bit 31, bit 2 -> word 1 bit 0
    assert _hex_words(pack_rows(v, 3)) == ["40000000", "00000001", "00000000"]
    v[10], v[21] = 0, 7  # value 21 starts at bit 63: bit 31 of word 1 and bits 0-1 of word 2
    assert _hex_words(pack_rows(v, 3)) == ["00000000", "80000000", "00000003"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [32, 96, 40])  # 40: not a whole run of 32, exercises the padded tail
def test_round_trip(bits, rows):
    torch.manual_seed(bits * rows)
    v = torch.randint(0, 2**bits, (rows, 7))
    packed = pack_rows(v, bits)
    assert packed.dtype == torch.int32 and packed.shape == (-(-rows * bits // 32), 7)
    assert torch.equal(unpack_rows(packed, bits)[:rows], v.int())
    assert torch.equal(unpack_cols(pack_cols(v.t(), bits), bits)[:, :rows], v.t().int())


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="unsupported bit width 5"):
        pack_rows(torch.zeros(32, 1, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="out of range for 4-bit"):
        pack_rows(torch.full((8, 1), 16), 4)


def test_layout_tables_live_on_the_tensors_device():
    # made there once and cached: a host-to-device copy per call cannot be captured in a CUDA graph (the reference
    # gptq_linear on a GPU fell back to eager decode steps); "meta" stands in for a GPU here
    from optgptq_compile.quant.packing import _layout

    word, offset = _layout(4, torch.device("meta"))
    assert word.device.type == "meta" and offset.device.type == "meta"
    assert _layout(4, torch.device("meta"))[0] is word
    assert unpack_rows(torch.zeros(4, 3, dtype=torch.int32, device="meta"), 4).device.type == "meta"
