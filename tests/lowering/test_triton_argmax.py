"""The greedy-token argmax kernel against torch.argmax in the Triton interpreter (cases: triton_argmax_cases.py)."""

from tests.lowering.interpreter import interpreter_on, run_in_interpreter

if interpreter_on():
    from tests.lowering.triton_argmax_cases import *  # noqa: F401,F403
else:

    def test_in_interpreter():
        run_in_interpreter(__file__)
