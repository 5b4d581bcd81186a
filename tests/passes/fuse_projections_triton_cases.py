"""Fused projections through the Triton kernels, in the interpreter (run by test_fuse_projections.py in a
TRITON_INTERPRET=1 process: see tests/lowering/interpreter.py). Act-order weights: select_kernels' sort then sees
the fused call, whose g_idx its members share."""

import torch

import optgptq_compile
from tests.lowering.interpreter import interpreter_on
from tests.models import call_targets, recording, tiny_llama

assert interpreter_on(), "run through test_fuse_projections.py (it sets TRITON_INTERPRET=1)"


def test_fused_act_order_calls_run_on_the_triton_kernel_at_prefill_and_decode():
    model = tiny_llama(layers=1)
    calib = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    options = {"bits": 4, "group_size": 32, "act_order": True, "calibration": calib, "strict": True}
    runs = {}
    for kernels in ("reference", "triton"):  # the second compile reuses the calibration and the fused weights
        torch._dynamo.reset()
        with recording() as graphs, torch.no_grad():
            model.forward = torch.compile(type(model).forward.__get__(model), backend="optgptq",
                                          options={**options, "kernels": kernels})
            out = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        runs[kernels] = (out.sequences, torch.stack(out.logits), graphs)
    seq, logits, graphs = runs["triton"]
    assert len(graphs) >= 2  # prefill (M = 6: the dot kernel) and decode (M = 1: the GEMV kernel)
    for gm in graphs:
        targets = call_targets(gm)
        # qkv, o, gate_up, down, all four with a norm or a residual folded in (fuse_norm_residual)
        assert targets.count(torch.ops.optgptq.gptq_linear_fused_triton.default) == 4
        # every call's act-order sort applied to its x, and to the norm weight folded into q/k/v and gate/up
        assert targets.count(torch.ops.aten.index_select.default) == 4 + 2
    torch.testing.assert_close(logits, runs["reference"][1], rtol=1e-4, atol=1e-4)
    assert torch.equal(seq, runs["reference"][0])
    assert optgptq_compile.stats()["projections_fused"] > 0
