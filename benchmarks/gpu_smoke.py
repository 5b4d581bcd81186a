"""GPU smoke check of the whole backend with strict=True (a pass error raises instead of falling back).

    PYTHONPATH=. python benchmarks/gpu_smoke.py

Tiny random-init Llama (GQA 4/2) and BLOOM in fp16 on CUDA: compile with backend="optgptq" (4-bit, Triton
kernels where registered), run `optgptq_compile.generate` and a padded HF forward, print counters and the greedy
agreement with dense HF generate.
"""

import torch

import optgptq_compile
from tests.models import sqnr_db, tiny_bloom, tiny_llama


def check(make, name):
    torch._dynamo.reset()
    optgptq_compile.reset_stats()
    model = make(dtype=torch.float16).cuda()
    prompts = [torch.randint(3, 128, (n,)).tolist() for n in (3, 9, 17)]
    ids = torch.randint(3, 128, (2, 12), device="cuda")
    with torch.no_grad():
        dense_logits = model(ids).logits
    dense = optgptq_compile.generate(model, prompts, max_new_tokens=8)
    options = {"bits": 4, "group_size": 32, "strict": True, "keep_dense": True}
    compiled = torch.compile(model, backend="optgptq", options=options)
    with torch.no_grad():
        logits = compiled(ids).logits
    out = optgptq_compile.generate(compiled, prompts, max_new_tokens=8)
    agree = sum(a == b for d, q in zip(dense, out) for a, b in zip(d, q)) / sum(map(len, dense))
    print(f"{name}: logits SQNR {sqnr_db(dense_logits.float(), logits.float()):.1f} dB, greedy agreement "
          f"{agree:.0%}, stats {optgptq_compile.stats()}", flush=True)


if __name__ == "__main__":
    check(tiny_llama, "llama")
    check(tiny_bloom, "bloom")
