"""SmolLM2-135M (real weights, offline): generate == HF greedy per prompt, batched and through preemption.
(The compiled path is checked on the tiny models in test_generate.py: compiling 30 layers costs ~1 min here.)"""

import torch

import optgptq_compile
from optgptq_compile.data import load_smollm2
from optgptq_compile.runtime.generate import last_stats

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]  # four lengths (5..10 tokens)


def test_smollm2_generate_matches_hf_greedy():
    model, tok = load_smollm2()
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    news = [8, 12, 6, 10]
    ref = [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
           for p, n in zip(prompts, news)]
    assert tok.decode(ref[0]).startswith(" Paris")  # the model is the real one
    # 3 blocks of 8 tokens for requests of 13..18 tokens: two run at a time, and they outgrow the pool
    assert optgptq_compile.generate(model, prompts, news, num_blocks=3, block_size=8) == ref
    stats = last_stats()
    assert stats["preemptions"] > 0 and stats["peak_blocks_used"] == 3
