import pytest
import torch

import optgptq_compile


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts with zeroed counters and no Dynamo caches from earlier tests."""
    torch._dynamo.reset()
    optgptq_compile.reset_stats()
    yield
    torch._dynamo.reset()
