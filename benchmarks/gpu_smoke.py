"""GPU smoke check of the whole backend with strict=True (a pass error raises instead of falling back).

    PYTHONPATH=. python benchmarks/gpu_smoke.py

Tiny random-init Llama (GQA 4/2) and BLOOM in fp16 on CUDA: compile with backend="optgptq" (4-bit, Triton
kernels where registered), run `optgptq_compile.generate` and a padded HF forward, print counters and the greedy
agreement with dense HF generate. Then the same quantized Llama (hidden 256, so the MLP's gate/up GEMV has whole
128-column tiles per half and computes silu(gate) * up in its epilogue) compiled with the Triton kernels against
the reference kernels: prefill logits and greedy tokens of one prompt (M = 1 decode) and of three (M = 3) must
agree; exits non-zero where they do not.
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


def check_kernels_against_reference() -> bool:
    """Triton kernels vs the reference ops on one quantized model: logits SQNR and greedy tokens."""
    torch._dynamo.reset()
    model = tiny_llama(hidden=256, layers=2, dtype=torch.float16).cuda()
    ids = torch.randint(3, 128, (2, 12), device="cuda")
    prompts = [torch.randint(3, 128, (n,)).tolist() for n in (3, 9, 17)]
    outs = {}
    for kernels in ("reference", "triton"):
        compiled = torch.compile(model, backend="optgptq", options={"bits": 4, "group_size": 32, "strict": True,
                                                                    "kernels": kernels})
        with torch.no_grad():
            logits = compiled(ids).logits.float()
        one = optgptq_compile.generate(compiled, [[5, 9, 11, 4]], max_new_tokens=12)
        three = optgptq_compile.generate(compiled, prompts, max_new_tokens=12)
        outs[kernels] = (logits, one, three)
        torch._dynamo.reset()
    sqnr = sqnr_db(outs["reference"][0], outs["triton"][0])
    same_one, same_three = outs["reference"][1] == outs["triton"][1], outs["reference"][2] == outs["triton"][2]
    print(f"triton vs reference kernels: prefill logits SQNR {sqnr:.1f} dB, greedy tokens equal at M=1 {same_one}, "
          f"M=3 {same_three}; stats {optgptq_compile.stats()}", flush=True)
    return sqnr > 40 and same_one and same_three


if __name__ == "__main__":
    check(tiny_llama, "llama")
    check(tiny_bloom, "bloom")
    if not check_kernels_against_reference():
        raise SystemExit("Triton kernels disagree with the reference kernels")
