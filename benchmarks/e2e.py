"""End-to-end decode throughput: Llama-2-7B-shaped random-weight model, int4 g128 through ``backend="optgptq"`` and
the paged-KV runtime, against HF ``generate`` fp16 eager and HF's static cache compiled by Inductor, same run.

    python benchmarks/e2e_decode.py                  # H100: batches 1 8 32 64, 512-token prompts (< 8 min)
    python benchmarks/e2e_decode.py --layers 4       # quick check of the whole script
    python benchmarks/e2e_decode.py --tiny           # CPU smoke test (tiny model, reference kernels)

Decode tok/s counts only decode steps: for the runtime, the time of steps in which every request decodes (timed
per step; each step ends with a host sync on the sampled tokens); for HF, (t(N new tokens) - t(1 new token)) of
two generate calls, i.e. N - 1 decode steps. Prompts are random token ids; EOS is ignored so every request runs
its full length.

HF static baseline: ``generate(..., cache_implementation="static")`` with *no* manual ``torch.compile``. On CUDA,
generate then compiles only the decode step (``CompileConfig``: inductor, mode="reduce-overhead"), after an eager
prefill that allocates the cache and marks it a static address -- so CUDA graphs survive the in-place cache
update. ``model.forward = torch.compile(model.forward, mode="reduce-overhead")`` instead compiles the prefill
too, which allocates the cache inside the trace, skips ``mark_static_address``, and makes Inductor drop CUDA
graphs for the mutated cache (3.3 tok/s measured). Writes ``e2e_decode.json`` to ``--out`` (default ``$OUT``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import optgptq_compile
from optgptq_compile.runtime.generate import build_engine
from optgptq_compile.runtime.memory import kv_bytes_per_token


def llama7b_config(layers: int, tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5)


def build_model(cfg: LlamaConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: run every request to its full length
    model.generation_config.pad_token_id = 0
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_runtime(compiled, batch: int, prompt_len: int, new_tokens: int, vocab: int, device, cuda_graphs: bool):
    """Our engine: a warm-up wave (compiles, captures the CUDA graph of this batch size), then a timed wave."""
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    engine = build_engine(compiled, prompts, 8, max_batch_size=batch, stop_at_eos=False, cuda_graphs=cuda_graphs,
                          num_blocks=batch * -(-(prompt_len + new_tokens) // 16), max_seq_len=prompt_len + new_tokens)
    with torch.inference_mode():
        while engine.has_work:
            engine.step()
        for p in prompts:
            engine.add_request(p, new_tokens, stop_ids=())
        decode_time, decode_tokens, prefill_time = 0.0, 0, 0.0
        while engine.has_work:
            before = engine.stats.decode_steps
            sync(device)
            start = time.perf_counter()
            events = engine.step()
            sync(device)
            elapsed = time.perf_counter() - start
            if engine.stats.decode_steps > before:
                decode_time += elapsed
                decode_tokens += len(events)
            else:
                prefill_time += elapsed
    per_token = kv_bytes_per_token(engine.config, engine.cache.k_pools[0].dtype)
    return {
        "decode_tok_s": decode_tokens / decode_time,
        "decode_steps": engine.stats.decode_steps,
        "graph_steps": engine.stats.graph_steps,
        "prefill_s": prefill_time,
        "kv_peak_allocated_bytes": engine.stats.peak_blocks_used * engine.block_size * per_token,
        "kv_live_token_bytes": engine.stats.peak_tokens_live * per_token,
    }


def bench_hf(model, batch: int, prompt_len: int, new_tokens: int, vocab: int, device, static: bool):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(device)
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids))
    if static:
        kw["cache_implementation"] = "static"

    def run(n):
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        assert out.shape[1] == prompt_len + n
        return time.perf_counter() - start

    run(4)  # warm-up (static: compiles the decode step for this batch size)
    t1, tn = min(run(1), run(1)), min(run(new_tokens), run(new_tokens))  # best of two: less noise
    per_token = kv_bytes_per_token(model.config, model.dtype)
    return {"decode_tok_s": batch * (new_tokens - 1) / (tn - t1), "prefill_s": t1,
            "kv_bytes": batch * (prompt_len + new_tokens) * per_token}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --tiny: 2)")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU: a smoke test of the script")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32,64)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512; --tiny: 32)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 128; --tiny: 8)")
    ap.add_argument("--hf-new-tokens", type=int, default=None, help="HF baselines (default 32; --tiny: 4)")
    ap.add_argument("--budget-s", type=float, default=450, help="skip remaining measurements past this time")
    ap.add_argument("--skip", default="", help="comma-separated: optgptq,hf_eager,hf_static")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    tiny = args.tiny
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    layers = args.layers or (2 if tiny else 32)
    batches = [int(b) for b in (args.batches or ("1,4" if tiny else "1,8,32,64")).split(",")]
    prompt_len = args.prompt_len or (32 if tiny else 512)
    new_tokens = args.new_tokens or (8 if tiny else 128)
    hf_new = args.hf_new_tokens or (4 if tiny else 32)
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.perf_counter()
    cfg = llama7b_config(layers, tiny)
    model = build_model(cfg, device, dtype)
    print(f"model: {layers} layers, hidden {cfg.hidden_size}, {dtype}, on {device} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "layers": layers,
               "prompt_len": prompt_len, "new_tokens": new_tokens, "hf_new_tokens": hf_new, "rows": []}

    def over_budget(what):
        if time.perf_counter() - t0 > args.budget_s:
            print(f"skipped {what}: past the {args.budget_s:.0f} s budget", flush=True)
            return True
        return False

    rows = {b: {"batch": b} for b in batches}
    if "optgptq" not in skip:
        # keep_dense: the HF baselines below run the same model object eagerly afterwards
        compiled = torch.compile(model, backend="optgptq", options={"bits": 4, "group_size": 128,
                                                                    "keep_dense": True})
        for b in batches:
            if over_budget(f"optgptq batch {b}"):
                break
            start = time.perf_counter()
            r = bench_runtime(compiled, b, prompt_len, new_tokens, cfg.vocab_size, device, device.type == "cuda")
            rows[b]["optgptq"] = r
            print(f"optgptq  batch {b:3d}: {r['decode_tok_s']:9.1f} tok/s  (graph steps {r['graph_steps']}, "
                  f"{time.perf_counter() - start:.0f} s)", flush=True)
        results["optgptq_stats"] = optgptq_compile.stats()
        del compiled
        torch._dynamo.reset()
    for name, static in (("hf_eager", False), ("hf_static", True)):
        if name in skip:
            continue
        for b in batches:
            if over_budget(f"{name} batch {b}"):
                break
            start = time.perf_counter()
            r = bench_hf(model, b, prompt_len, hf_new, cfg.vocab_size, device, static)
            rows[b][name] = r
            print(f"{name:9s} batch {b:3d}: {r['decode_tok_s']:9.1f} tok/s  ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    results["rows"] = list(rows.values())
    results["total_s"] = time.perf_counter() - t0

    def cell(row, key, field="decode_tok_s", fmt="{:.1f}"):
        return fmt.format(row[key][field]) if key in row else "-"

    print(f"\n{results['device']}, Llama-2-7B shape ({layers} layers), prompts {prompt_len} tokens; decode tok/s")
    print("| batch | optgptq int4 g128 + paged KV | HF fp16 eager | HF fp16 static + Inductor | vs eager | "
          "vs static | KV MiB optgptq (alloc / live) | KV MiB HF |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in results["rows"]:
        ours = row.get("optgptq", {}).get("decode_tok_s")
        ratio = {k: (f"{ours / row[k]['decode_tok_s']:.2f}x" if ours and k in row else "-")
                 for k in ("hf_eager", "hf_static")}
        kv_ours = (f"{row['optgptq']['kv_peak_allocated_bytes'] / 2**20:.0f} / "
                   f"{row['optgptq']['kv_live_token_bytes'] / 2**20:.0f}" if "optgptq" in row else "-")
        hf = next((row[k] for k in ("hf_eager", "hf_static") if k in row), None)
        kv_hf = f"{hf['kv_bytes'] / 2**20:.0f}" if hf else "-"
        print(f"| {row['batch']} | {cell(row, 'optgptq')} | {cell(row, 'hf_eager')} | {cell(row, 'hf_static')} | "
              f"{ratio['hf_eager']} | {ratio['hf_static']} | {kv_ours} | {kv_hf} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "e2e_decode.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\nwrote {path} ({results['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
