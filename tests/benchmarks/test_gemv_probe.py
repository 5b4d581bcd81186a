"""benchmarks/gemv_probe.py's diagnostic variants are source edits of the shipped GEMV kernel: each must still find
the lines it replaces (a kernel change that moves them fails here, not on the GPU) and give a module that imports."""

import pytest

pytest.importorskip("triton")

from benchmarks import gemv_probe  # noqa: E402


@pytest.mark.parametrize("name", gemv_probe.VARIANTS)
def test_variant_applies_to_the_kernel(name, tmp_path, monkeypatch):
    src = gemv_probe.variant_source(name)
    assert (src == open(gemv_probe.SRC).read()) == (name == "base")  # every other variant changes something
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(gemv_probe, "_loaded", {})
    assert callable(gemv_probe.load(name).gptq_gemv_kernel)


def test_unknown_variant_is_refused():
    with pytest.raises(KeyError, match="unknown variant 'nope'"):
        gemv_probe.variant_source("nope")
