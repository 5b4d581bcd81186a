"""PagedKVCache as HF generate's cache (``cache=``, or ``past_key_values=`` in older transformers): the same tokens
and logits as DynamicCache."""

import pytest
import torch
from transformers import DynamicCache

from optgptq_compile.runtime.paged_cache import PagedKVCache
from optgptq_compile.runtime.scheduler import cache_kwarg
from tests.models import tiny_bloom, tiny_llama


@pytest.mark.parametrize("make", [tiny_llama, tiny_bloom])
def test_hf_generate_same_as_dynamic_cache(make):
    model = make()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: HF stores the pad tokens in the cache too and masks them
    mask[2, :10] = 0  # a one-token prompt
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    ref = model.generate(ids, **{cache_kwarg(model): DynamicCache(config=model.config)}, **kw)
    cache = PagedKVCache(model.config, num_blocks=30, block_size=4)  # 3 rows x 23 tokens = 18 blocks
    out = model.generate(ids, **{cache_kwarg(model): cache}, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == ids.shape[1] + 12 - 1  # the last token is never fed back
    assert cache.allocator.num_free == 30 - 3 * -(-(11 + 11) // 4)
    cache.reset()
    assert cache.allocator.num_free == 30


def test_update_returns_left_padded_context_and_writes_blocks():
    model = tiny_llama()
    cache = PagedKVCache(model.config, num_blocks=8, block_size=4)
    k1 = torch.randn(2, 2, 5, 16)
    v1 = torch.randn(2, 2, 5, 16)
    keys, values = cache.update(k1, v1, 0)
    assert torch.equal(keys, k1) and torch.equal(values, v1)
    k2, v2 = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    keys, _ = cache.update(k2, v2, 0)
    assert torch.equal(keys, torch.cat([k1, k2], 2))
    # row 1's 6 tokens sit in its own blocks of the pool, token-major
    blocks = cache._hf_tables[1].blocks
    stored = cache.k_pools[0][blocks].reshape(-1, 2, 16)[:6]  # [6, Hkv, D]
    assert torch.equal(stored, torch.cat([k1, k2], 2)[1].transpose(0, 1))
    with pytest.raises(ValueError, match="batch size changed"):
        cache.update(torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16), 0)


def test_compiled_hf_generate_with_padding_keeps_the_gather():
    """HF generate stores left-pad tokens in the cache: paged_attention (which knows only context lengths) would
    attend to them, so paged_kv must leave this attention alone -- and the answer must stay right."""
    import optgptq_compile

    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    model.forward = torch.compile(model.forward, backend="optgptq", options={"bits": None})
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         **{cache_kwarg(model): PagedKVCache(model.config, num_blocks=16, block_size=4)})
    assert torch.equal(out, ref)
    stats = optgptq_compile.stats()
    assert stats["paged_kv_skipped"] > 0 and "paged_attention_rewritten" not in stats
