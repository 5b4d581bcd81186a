"""Opt-GQA on the real SmolLM2-135M (9 query / 3 KV heads): perplexity after merging KV heads, and KV memory.

    python benchmarks/opt_gqa.py [--kv-heads 1] [--calibration 32] [--eval 12] [--length 512]

Rows: the original model; mean pooling (Ainslie et al. 2023); "aligned" without calibration (weights only, every
input direction weighted equally); "aligned" with calibration (E[x x^T] of each attention input on the
calibration texts), one-shot (activations of the original model) and sequential (activations of the model with
the earlier layers already merged), and the default: sequential plus a least-squares refit of each output
projection to what the original attention fed it. Perplexity on held-out license texts disjoint from the calibration texts (data.py).
KV bytes per token = 2 (K and V) x layers x KV heads x head_dim x bytes per element.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from optgptq_compile.data import calibration_tokens, eval_tokens, load_smollm2
from optgptq_compile.gqa import convert_gqa


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) over every position of every window [N, S]."""
    total, count = 0.0, 0
    for ids in windows.split(batch_size):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def kv_bytes_per_token(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--calibration", type=int, default=32, help="calibration windows")
    ap.add_argument("--eval", type=int, default=12, help="evaluation windows")
    ap.add_argument("--length", type=int, default=512, help="tokens per window")
    ap.add_argument("--rows", default="none,mean,aligned-nocal,aligned-oneshot,aligned-seq,aligned",
                    help="comma-separated rows to run")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    _, tok = load_smollm2()
    cal = calibration_tokens(tok, args.calibration, args.length)
    ev = eval_tokens(tok, args.eval, args.length)
    print(f"SmolLM2-135M fp32, CPU {torch.get_num_threads()} threads; calibration {tuple(cal.shape)}, eval {tuple(ev.shape)}")
    rows = {
        "none": ("no merge", None, None, {}),
        "mean": ("mean pooling", "mean", None, {}),
        "aligned-nocal": ("aligned, no calibration", "aligned", None, {}),
        "aligned-oneshot": ("aligned, calibrated one-shot", "aligned", cal, dict(sequential=False, refit=False)),
        "aligned-seq": ("aligned, calibrated sequential", "aligned", cal, dict(refit=False)),
        "aligned-oneshot-refit": ("aligned, one-shot + output refit", "aligned", cal, dict(sequential=False)),
        "aligned": ("aligned, sequential + output refit (default)", "aligned", cal, {}),
    }
    print("| merge | KV heads | perplexity | KV bytes/token | KV memory saved | convert s |")
    print("| --- | --- | --- | --- | --- | --- |")
    base_bytes = kv_bytes_per_token(load_smollm2()[0])
    for name, method, calibration, extra in (rows[r] for r in args.rows.split(",")):
        model, _ = load_smollm2()
        start = time.perf_counter()
        if method is not None:
            convert_gqa(model, args.kv_heads, calibration=calibration, method=method, **extra)
        seconds = time.perf_counter() - start
        kv = kv_bytes_per_token(model)
        ppl = perplexity(model, ev)
        print(f"| {name} | {model.config.num_key_value_heads} | {ppl:.2f} | {kv} | {1 - kv / base_bytes:.0%} | "
              f"{seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
