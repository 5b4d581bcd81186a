"""quant.cache: releasing dense weights whose storage cannot be resized (memory-mapped safetensors)."""

import torch
from safetensors.torch import load_file, save_file

from optgptq_compile.quant import cache


def test_release_dense_frees_a_memory_mapped_weight(tmp_path):
    save_file({"w": torch.randn(16, 32)}, tmp_path / "w.safetensors")
    param = torch.nn.Parameter(load_file(tmp_path / "w.safetensors")["w"])  # how from_pretrained loads weights
    assert not param.untyped_storage().resizable()
    assert cache.release_dense(param) == 16 * 32 * 4
    assert param.shape == (16, 32) and param.untyped_storage().nbytes() == 0 and cache.is_released(param)
    assert cache.release_dense(param) == 0  # idempotent
