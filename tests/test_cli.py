"""The ``optgptq`` command: each subcommand on small models, and its error messages."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optgptq_compile.cli import main
from optgptq_compile.data import load_smollm2

CALIBRATION = "/usr/share/common-licenses/GPL-3"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-init Llama saved with SmolLM2's tokenizer (real text tokenizes, no network)."""
    _, tokenizer = load_smollm2()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_quantize_then_generate(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["quantize", str(tiny_model_dir), "--calibration", CALIBRATION, "--out", str(out),
                 "--windows", "2", "--length", "64", "--group-size", "32"]) == 0
    assert (out / "config.json").exists() and "4-bit GPTQ checkpoint" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "The license", "--prompt", "Free software",
                 "--max-new-tokens", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "->" in line]
    assert len(lines) == 2 and lines[0].startswith("'The license' ->")


def test_bench_linear_prints_a_table(capsys):
    assert main(["bench", "linear", "--shape", "128x256", "--m", "1", "4", "--group-size", "32"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 ") or line.startswith("| 4 ")]
    assert len(rows) == 2


def test_bench_e2e_writes_its_table(tmp_path, capsys):
    """The CLI wiring of the end-to-end benchmark (tests/bench/test_e2e.py runs every config)."""
    assert main(["bench", "e2e", "--tiny", "--rows", "hf_eager", "--batches", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "e2e.json").exists() and "| 2 |" in (tmp_path / "e2e.md").read_text()
    assert "Decode tokens/s" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: an unknown config
        main(["bench", "e2e", "--rows", "vllm"])


def test_dump_writes_graphs(tiny_model_dir, tmp_path, capsys):
    assert main(["dump", str(tiny_model_dir), "--out", str(tmp_path / "d"), "--group-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "00_captured.py" in out and "report.txt" in out and "linear_rewritten" in out


def test_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit, match="checkpoint directory not found"):
        main(["generate", str(tmp_path / "missing"), "--prompt", "x"])
    with pytest.raises(SystemExit, match="calibration text file not found"):
        from optgptq_compile.cli import _read_calibration

        _read_calibration(None, str(tmp_path / "nope.txt"), 2, 64)
    assert main(["dump", str(tmp_path / "no-model"), "--out", str(tmp_path / "d")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_flag:  # argparse: unsupported bit width
        main(["bench", "linear", "--bits", "5"])
    assert bad_flag.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
