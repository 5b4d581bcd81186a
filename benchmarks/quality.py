"""Perplexity of SmolLM2-135M-Instruct (offline real weights) dense, RTN and GPTQ, on held-out English text.

    python benchmarks/quality.py dense rtn:bits=4,group_size=128 gptq:bits=4,group_size=128,act_order=True

Each spec is ``method[:key=value,...]``; methods: ``dense``, ``rtn`` (min-max round-to-nearest, the data-free default;
clip_search=True: ranges from an unweighted clipping search instead), ``gptq`` (calibrated on ``calibration_tokens``), ``gptq-synthetic`` (calibrated on
random token ids: what the backend could do without calibration), ``compile`` (one call:
``torch.compile(backend="optgptq", options={"calibration": ids, ...})``). Calibration: 16 x 512 tokens of GPL-3,
Apache-2.0, MPL-2.0, LGPL-2.1, GFDL-1.3 (``--calib-n``); evaluation: 8 x 512 tokens of GPL-2, Artistic, CC0-1.0,
MPL-1.1, LGPL-2 (``--eval-n``; sized so that a GPTQ row takes minutes on 2 shared CPU cores). Appends one JSON line
per spec to ``--out`` and prints a markdown row.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

import optgptq_compile
from optgptq_compile.config import parse_options
from optgptq_compile.data import calibration_tokens, eval_tokens, load_smollm2
from optgptq_compile.eval import perplexity
from optgptq_compile.quant.api import replace_linears
from optgptq_compile.quant.format import default_g_idx, num_groups, pack_weight
from optgptq_compile.quant.gptq import group_params
from optgptq_compile.quant.rtn import quantize_rtn
from optgptq_compile.quant.sequential import eligible_linears, find_blocks


def _value(text: str):
    return {"True": True, "False": False, "None": None}.get(text, int(text) if text.lstrip("-").isdigit() else
                                                            (float(text) if text.replace(".", "", 1).isdigit() else text))


def parse_spec(spec: str) -> tuple[str, dict]:
    method, _, rest = spec.partition(":")
    options = {k: _value(v) for k, v in (kv.split("=") for kv in rest.split(",") if kv)}
    return method, options


def rtn_clipped(weight: torch.Tensor, bits: int, group_size: int, sym: bool):
    """Round-to-nearest with each group's range from the clipping search, unweighted (no data)."""
    n, k = weight.shape
    size = k if group_size == -1 else group_size
    groups = num_groups(k, group_size)
    scales, zeros = torch.empty(groups, n), torch.empty(groups, n)  # [G, N]
    ints = torch.empty(n, k, dtype=torch.int32)  # [N, K]
    for g in range(groups):
        cols = slice(g * size, min((g + 1) * size, k))
        w = weight[:, cols].float()
        scales[g], zeros[g] = group_params(w, bits, sym, True)
        ints[:, cols] = (torch.round(w / scales[g][:, None]) + zeros[g][:, None]).clamp(0, 2**bits - 1).int()
    return pack_weight(ints, zeros, scales.half(), default_g_idx(k, group_size), bits, group_size)


def rtn_model(model, options: dict):
    config = parse_options(options)
    name, blocks = find_blocks(model)
    weights = {}
    for i, block in enumerate(blocks):
        for lname, mod in eligible_linears(block, config.bits).items():
            w = mod.weight.detach()
            weights[f"{name}.{i}.{lname}"] = rtn_clipped(w, config.bits, config.group_size, config.sym) \
                if config.clip_search else quantize_rtn(w, config.bits, config.group_size, config.sym)
    return replace_linears(model, weights)


def run(spec: str, args) -> dict:
    method, options = parse_spec(spec)
    model, tok = load_smollm2()
    calib = calibration_tokens(tok, args.calib_n, args.calib_len)
    windows = eval_tokens(tok, args.eval_n, 512)
    torch.manual_seed(0)
    start = time.perf_counter()
    if method == "dense":
        pass
    elif method == "rtn":
        rtn_model(model, {"clip_search": False, **options})
    elif method == "gptq":
        optgptq_compile.quantize(model, calib, **options)
    elif method == "gptq-synthetic":
        optgptq_compile.quantize(model, torch.randint(0, model.config.vocab_size, calib.shape), **options)
    elif method == "compile":
        model.forward = torch.compile(model.forward, backend="optgptq", dynamic=False,
                                      options={"calibration": calib, "kernels": "reference", **options})
        model(input_ids=windows[:args.batch], use_cache=False)  # compile (and calibrate) before timing ends
    else:
        raise ValueError(f"unknown method {method!r}")
    quant_s = time.perf_counter() - start
    ppl = perplexity(model, windows, batch_size=args.batch)
    row = {"spec": spec, "ppl": round(ppl, 3), "quant_s": round(quant_s, 1), "calib": list(calib.shape),
           "eval": list(windows.shape), "threads": torch.get_num_threads()}
    print(f"| {spec} | {ppl:.2f} | {quant_s:.0f} |", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+")
    parser.add_argument("--calib-n", type=int, default=16)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--eval-n", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default="quality.jsonl")
    args = parser.parse_args()
    logging.getLogger("optgptq_compile").setLevel(logging.WARNING)
    for spec in args.specs:
        row = run(spec, args)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
