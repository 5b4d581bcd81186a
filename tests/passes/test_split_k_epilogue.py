"""passes/split_k_epilogue.py: its cases need Triton kernels, so they run in the interpreter
(split_k_epilogue_cases.py); the CPU-only behaviour is checked here."""

import torch

import optgptq_compile
from optgptq_compile.lowering.gptq_linear import torch_gptq_linear, torch_gptq_linear_partials
from optgptq_compile.quant.format import default_g_idx, pack_weight
from tests.lowering.interpreter import interpreter_on, run_in_interpreter
from tests.models import call_targets, recording, tiny_llama

if interpreter_on():
    from tests.passes.split_k_epilogue_cases import *  # noqa: F401,F403
else:

    def test_in_interpreter():
        run_in_interpreter(str(__import__("pathlib").Path(__file__)))


def test_reference_kernels_are_never_rewritten():
    """kernels='reference' (the CPU path): the partials op would only add work there."""
    torch._dynamo.reset()
    with recording() as graphs:
        torch.compile(tiny_llama(layers=1, hidden=256), backend="optgptq",
                      options={"bits": 4, "group_size": 32, "kernels": "reference", "strict": True})(
            torch.randint(3, 128, (1, 1)))
    targets = [t for g in graphs for t in call_targets(g)]
    assert torch.ops.optgptq.gptq_linear.default in targets
    assert torch.ops.optgptq.gptq_linear_partials.default not in targets


def test_partials_op_reference_opcheck_and_errors():
    g = torch.Generator().manual_seed(0)
    w = pack_weight(torch.randint(0, 16, (48, 192), generator=g), torch.randint(0, 16, (3, 48), generator=g),
                    torch.rand(3, 48, generator=g) * 0.02 + 0.005, default_g_idx(192, 64), 4, 64)
    x = torch.randn(2, 1, 192)
    part = torch.ops.optgptq.gptq_linear_partials(x, w.qweight, w.qzeros, w.scales, w.g_idx, 4, 64, 80)
    assert part.shape == (3, 2, 1, 48) and part.dtype == torch.float32  # slices of 80, 80 and 32
    torch.testing.assert_close(part.sum(0), torch_gptq_linear(x, w.qweight, w.qzeros, w.scales, w.g_idx, None, 4))
    torch.testing.assert_close(part[2], x[..., 160:] @ torch_gptq_linear_partials(
        torch.eye(192), w.qweight, w.qzeros, w.scales, w.g_idx, 4, 192)[0][160:])
    torch.library.opcheck(torch.ops.optgptq.gptq_linear_partials.default,
                          (x, w.qweight, w.qzeros, w.scales, w.g_idx, 4, 64, 80))
    for bad in (0, 12):  # not a positive multiple of 8 values a word
        try:
            torch.ops.optgptq.gptq_linear_partials(x, w.qweight, w.qzeros, w.scales, w.g_idx, 4, 64, bad)
        except ValueError as exc:
            assert "split_len" in str(exc)
        else:
            raise AssertionError(f"split_len={bad} accepted")
    assert optgptq_compile  # the backend registered the op
