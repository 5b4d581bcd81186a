"""optgptq::rope_paged_attention_triton against the reference and the two kernels it replaces, in the Triton
interpreter (cases: triton_rope_paged_attention_cases.py)."""

from tests.lowering.interpreter import interpreter_on, run_in_interpreter

if interpreter_on():
    from tests.lowering.triton_rope_paged_attention_cases import *  # noqa: F401,F403
else:

    def test_in_interpreter():
        run_in_interpreter(__file__)
