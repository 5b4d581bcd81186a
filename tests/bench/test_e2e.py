"""The end-to-end benchmark: the --tiny run of every config writes its JSON, table and plot; --plot-only merges
saved runs; the budget skips what it must; a missing matplotlib costs only the plots."""

import json
import sys

import pytest

from optgptq_compile.bench import e2e, report
from optgptq_compile.bench.e2e import Budget, main


def test_tiny_run_measures_every_config(tmp_path):
    assert main(["--tiny", "--batches", "1,3", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "e2e.json").read_text())
    assert [row["batch"] for row in r["rows"]] == [1, 3]
    for row in r["rows"]:
        for config in e2e.ROWS:
            cell = row[config]
            assert "error" not in cell, cell
            assert cell["decode_tok_s"] > 0 and cell["ttft_ms"] > 0
    opt = [row["optgptq"] for row in r["rows"]]
    assert [c["kv_pool_bytes"] for c in opt] == [c["kv_peak_allocated_bytes"] for c in opt]  # pool sized exactly
    assert all(c["kv_live_token_bytes"] <= c["kv_peak_allocated_bytes"] for c in opt)
    assert all(c["decode_steps"] == 8 - 1 for c in opt)  # the timed wave only: 8 new tokens, the first by prefill
    stats = r["configs"]["optgptq"]["stats"]
    assert stats["fallbacks"] == 0 and stats["linear_rewritten"] > 0 and stats["attention_rewritten"] > 0
    tinygemm = r["configs"]["int4_tinygemm"]
    assert tinygemm["linears_replaced"] == 2 * 7 and tinygemm["self_check_rel_error"] < 1e-4
    assert r["configs"]["int4_tinygemm"]["weights_bytes"] < r["configs"]["hf_eager"]["weights_bytes"]
    table = (tmp_path / "e2e.md").read_text()
    assert "| batch | HF eager | HF static + Inductor | int4 tinygemm + Inductor | optgptq int4 + paged KV |" in table
    assert "No GPU" in table and "| 3 |" in table and "| error" not in table and "failed" not in table
    if _have_matplotlib():
        assert (tmp_path / "e2e_decode_tok_s.png").stat().st_size > 1000
        assert not (tmp_path / "e2e_memory.png").exists()  # no GPU memory numbers on the CPU


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _run(rows: dict, skipped=(), layers=32) -> dict:
    """A saved GPU run, made up for the report's tests (values are not measurements)."""
    def cell(v):
        return {"decode_tok_s": v, "ttft_ms": 10 * v, "peak_mem_bytes": v * 2**28, "kv_pool_bytes": v * 2**20,
                "kv_peak_allocated_bytes": v * 2**20, "kv_live_token_bytes": v * 2**19, "decode_steps": 127,
                "graph_steps": 127}
    return {"device": "GPU", "gpu": True, "torch": "t", "transformers": "x", "prompt_len": 512, "new_tokens": 128,
            "hf_new_tokens": 32, "kv_bytes_per_token": 2**19,
            "model": {"layers": layers, "hidden": 4096, "heads": 32, "kv_heads": 32, "vocab": 32000, "tiny": False},
            "rows": [{"batch": b, **{c: cell(v) for c, v in cells.items()}} for b, cells in rows.items()],
            "configs": {c: {"dtype": "torch.float16", "weights_bytes": 2**30}
                        for cells in rows.values() for c in cells},
            "skipped": list(skipped)}


def test_plot_only_merges_runs(tmp_path):
    first = _run({1: {"optgptq": 100.0}, 32: {"optgptq": 2000.0}},
                 skipped=[{"config": "hf_static", "batch": None, "why": "past the budget"}])
    second = _run({1: {"hf_static": 80.0, "int4_tinygemm": 120.0}, 64: {"hf_eager": 1500.0}})
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for p, run in zip(paths, (first, second)):
        p.write_text(json.dumps(run))
    out = tmp_path / "out"
    merged = main(["--plot-only", *map(str, paths), "--out", str(out)]) or report.merge(
        [report.load(str(p)) for p in paths])
    assert [row["batch"] for row in merged["rows"]] == [1, 32, 64]
    assert merged["skipped"] == []  # hf_static was measured by the second run
    table = (out / "e2e.md").read_text()
    assert "| 1 | - | 80.0 | 120.0 | 100.0 | 1.25x | 0.83x |" in table
    assert "| 64 | 1500.0 | - | - | - | - | - |" in table
    assert not (out / "e2e.json").exists()  # --plot-only writes only the table and plots
    if _have_matplotlib():
        assert (out / "e2e_decode_tok_s.png").exists() and (out / "e2e_memory.png").exists()


def test_merge_refuses_different_setups():
    with pytest.raises(ValueError, match="model"):
        report.merge([_run({1: {"optgptq": 1.0}}), _run({1: {"hf_eager": 1.0}}, layers=4)])


def test_missing_matplotlib_skips_only_the_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths = report.write(_run({1: {"optgptq": 100.0}}), str(tmp_path), json_too=True)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["e2e.json", "e2e.md"]
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_budget_shares(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(e2e.time, "perf_counter", lambda: now[0])
    budget = Budget(100)
    budget.start_config(4)  # a quarter of the 100 s left: until 25 s
    now[0] = 30.0
    assert budget.why_not(headline=True) is None  # headline batches run while the total lasts
    assert "share" in budget.why_not(headline=False)
    budget.start_config(3)  # 70 s left for 3 configs: until 53.3 s
    now[0] = 50.0
    assert budget.why_not(headline=False) is None
    now[0] = 54.0
    assert "share" in budget.why_not(headline=False)
    now[0] = 101.0
    assert "budget" in budget.why_not(headline=True)


def test_past_budget_skips_every_config(tmp_path):
    assert main(["--tiny", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "e2e.json").read_text())
    assert [s["config"] for s in r["skipped"]] == list(e2e.ROWS) and r["configs"] == {}
    assert "skipped optgptq int4 + paged KV (every batch)" in (tmp_path / "e2e.md").read_text()
