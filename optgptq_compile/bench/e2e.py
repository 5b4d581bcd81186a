"""End-to-end decode benchmark: a Llama-2-7B-shaped random-weight model served four ways, same run, same prompts.

    optgptq bench e2e                      # GPU: 32 layers, batches 1,32,8,64, 512-token prompts (about 8 min)
    optgptq bench e2e --layers 4           # quick check of the whole benchmark
    optgptq bench e2e --tiny               # CPU smoke test: tiny model, reference kernels (< 1 min)
    optgptq bench e2e --rows optgptq --ab-env OPTGPTQ_PDL=0   # each optgptq batch again with PDL off (A/B)
    optgptq bench e2e --plot-only a.json [b.json]   # redraw the table and plots (merging runs) on any machine

Configs (``--rows``; run in this order, each on a freshly built model so its peak memory is its own):

- ``optgptq``: int4 g128 (RTN: random weights need no calibration) via ``torch.compile(model, backend="optgptq",
  options={"strict": True})`` -- a pass failure raises instead of silently timing the dense fallback graph --
  Triton kernels on a GPU, served by the paged-KV runtime (``build_engine``: the Engine behind
  ``optgptq_compile.generate``) with CUDA graphs for decode steps.
- ``hf_eager``: HF ``generate`` fp16, DynamicCache, no compile.
- ``hf_static``: HF ``generate(..., cache_implementation="static")`` fp16 with *no* manual ``torch.compile``: on
  CUDA generate compiles only the decode step (Inductor, ``mode="reduce-overhead"``) after an eager prefill that
  allocates the cache and marks it a static address, so CUDA graphs survive the in-place cache update. Compiling
  ``model.forward`` by hand also compiles the prefill, which allocates the cache inside the trace, and Inductor
  then drops CUDA graphs for the mutated cache (3.3 tok/s measured). The same model object as ``hf_eager``.
- ``int4_tinygemm``: every decoder ``nn.Linear`` (not ``lm_head``) replaced by torch's int4 tinygemm op
  (``bench.tinygemm``: asymmetric RTN g128, what torchao / gpt-fast run), then the ``hf_static`` recipe. bf16 on
  CUDA: tinygemm's CUDA kernel takes bf16 activations only.

Metrics per config and batch: decode tok/s, time to first token (the whole batch's prefill, in ms), peak GPU memory
(``torch.cuda.max_memory_allocated`` over the timed part, after a warm-up: weights + KV + activations + CUDA-graph
pools; compile-time transients excluded) and KV bytes. Decode tok/s counts only decode steps, by wall clock with
the host's work included: for the runtime, the tokens after every request has its first token over the time from
then to the last token (no sync per step: the engine overlaps a step's host work with the previous step's GPU
work); for HF, ``B * (N - 1) / (t(N new tokens) - t(1 new token))`` of two generate calls. The runtime prefills
the whole batch in one step (``--max-prefill-tokens``, default batch x prompt), as HF does, so every decode step
runs the full batch. Prompts are random token ids; EOS is ignored so every request runs its full length.

``--budget-s`` bounds the measuring: no measurement starts past it. Batches run in the order given, and a
config's first two (the default order puts the issue's headline sizes 1 and 32 first) run whenever the total
budget lasts; its later ones only inside its share of the budget: an equal part of the time left when the config
started (time a config does not use passes to the next ones). So the last configs keep time for their headline
batches. Writes ``e2e.json`` (also after every measurement: a run killed by a time limit keeps what it measured),
``e2e.md`` and PNG plots (matplotlib, optional) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import time
import traceback

import torch

# run order: the product first; HF eager before HF static on their shared model, so no compiled state is around
ROWS = ("optgptq", "hf_eager", "hf_static", "int4_tinygemm")
HEADLINE_BATCHES = 2  # a config's first two batches (default 1 and 32) run whatever its share of the budget


@dataclasses.dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype  # the fp16 rows' dtype (fp32 on the CPU)
    tiny: bool
    layers: int
    batches: list[int]
    prompt_len: int
    new_tokens: int
    hf_new_tokens: int
    max_prefill_tokens: int  # 0: the whole batch in one prefill step
    budget_s: float
    rows: list[str]
    optgptq_options: dict  # backend options of the optgptq row
    ab_env: dict = dataclasses.field(default_factory=dict)  # optgptq measured again with these env vars (A/B)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# --- model ------------------------------------------------------------------------------------------------------
def llama7b_config(layers: int, tiny: bool):
    from transformers import LlamaConfig

    if tiny:  # every linear's K a multiple of 128 and N of 16: tinygemm's constraints
        return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5)


def build_model(cfg, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)  # every config gets the same weights (up to its dtype)
    with device:
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: run every request to its full length
    model.generation_config.pad_token_id = 0
    return model.eval()


def random_prompts(batch: int, s: Settings, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)  # same prompts for every config at this batch size
    return torch.randint(3, vocab, (batch, s.prompt_len), generator=g)  # [B, P]; ids >= 3: no pad/bos/eos


# --- measuring --------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: torch.device):
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def forget_generate_state(model) -> None:
    """Drop what HF ``generate`` keeps on a model between calls (a static cache in some versions, the compiled
    decode step), so a config that reuses the model does not carry its memory."""
    for attr in ("_cache", "_compiled_call"):
        if attr in vars(model):
            delattr(model, attr)


def release(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks between configs, so the next one's peak memory is its own."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def release_after_error(device: torch.device) -> None:
    """Let the next measurement start clean after a failed one (an OOM leaves cached blocks behind)."""
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except RuntimeError as exc:  # a sticky CUDA error: the next measurement will report it too
            print(f"after the failure: {exc}", flush=True)


def measure_runtime(compiled, batch: int, s: Settings) -> dict:
    """optgptq's Engine: a warm-up wave (compiles, captures this batch size's CUDA graph), then a timed wave."""
    from optgptq_compile.runtime.generate import build_engine
    from optgptq_compile.runtime.memory import kv_bytes_per_token
    from optgptq_compile.runtime.scheduler import model_config

    config = model_config(compiled)
    prompts = random_prompts(batch, s, config.vocab_size).tolist()
    total, block = s.prompt_len + s.new_tokens, 16
    engine = build_engine(compiled, prompts, 8, max_batch_size=batch, stop_at_eos=False, cuda_graphs=s.cuda,
                          num_blocks=batch * -(-total // block), block_size=block, max_seq_len=total,
                          max_prefill_tokens=s.max_prefill_tokens or batch * s.prompt_len)
    with torch.inference_mode():
        while engine.has_work:
            engine.step()
        reset_peak(s.device)
        warm_decode_steps, warm_graph_steps = engine.stats.decode_steps, engine.stats.graph_steps
        for p in prompts:
            engine.add_request(p, s.new_tokens, stop_ids=())
        # TTFT: until every request has its first token. Decode: wall clock from there to the end, no sync per
        # step (the engine overlaps its host work with the GPU; a sync per step would serialise them again).
        first_token_s, decode_start, decode_tokens, started = None, None, 0, set()
        sync(s.device)
        start = time.perf_counter()
        while engine.has_work:
            events = engine.step()
            if decode_start is not None:
                decode_tokens += len(events)
                continue
            started.update(e.index for e in events)
            if len(started) == batch:
                sync(s.device)
                decode_start = time.perf_counter()
                first_token_s = decode_start - start
        sync(s.device)
        decode_s = time.perf_counter() - decode_start
    per_token = kv_bytes_per_token(config, engine.cache.k_pools[0].dtype)
    return {
        "decode_tok_s": decode_tokens / decode_s,
        "ttft_ms": first_token_s * 1e3,
        "peak_mem_bytes": peak_bytes(s.device),
        "decode_steps": engine.stats.decode_steps - warm_decode_steps,  # of the timed wave
        "graph_steps": engine.stats.graph_steps - warm_graph_steps,
        "kv_pool_bytes": engine.cache.allocator.num_blocks * block * per_token,
        "kv_peak_allocated_bytes": engine.stats.peak_blocks_used * block * per_token,
        "kv_live_token_bytes": engine.stats.peak_tokens_live * per_token,
    }


def measure_hf(model, batch: int, s: Settings, static: bool) -> dict:
    """HF ``generate``: warm-up with the timed length (static: compiles the decode step for this shape once), then
    1 and N new tokens, best of two (the difference is N - 1 decode steps)."""
    from optgptq_compile.runtime.memory import kv_bytes_per_token

    ids = random_prompts(batch, s, model.config.vocab_size).to(s.device)
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids))
    if static:
        kw["cache_implementation"] = "static"
    n = s.hf_new_tokens

    def run(new: int) -> float:
        sync(s.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        sync(s.device)
        assert out.shape[1] == s.prompt_len + new
        return time.perf_counter() - start

    warm_s = run(n)
    reset_peak(s.device)
    repeats = 2 if warm_s < 5 else 1  # best of two against noise, unless one call is long (a big batch's prefill)
    t1 = min(run(1) for _ in range(repeats))
    tn = min(run(n) for _ in range(repeats))
    return {
        "decode_tok_s": batch * (n - 1) / max(tn - t1, 1e-9),
        "ttft_ms": t1 * 1e3,
        "peak_mem_bytes": peak_bytes(s.device),
        "kv_bytes": batch * (s.prompt_len + n) * kv_bytes_per_token(model.config, model.dtype),
    }


# --- configs ----------------------------------------------------------------------------------------------------
class Budget:
    """The total measuring budget and each config's share of it (see the module docstring)."""

    def __init__(self, total_s: float):
        self.total_s, self.t0 = total_s, time.perf_counter()
        self.deadline = self.t0 + total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def start_config(self, configs_left: int) -> None:
        left = self.total_s - self.elapsed()
        self.deadline = time.perf_counter() + max(left, 0.0) / max(configs_left, 1)

    def why_not(self, headline: bool) -> str | None:
        if self.elapsed() > self.total_s:
            return f"past the {self.total_s:.0f} s budget"
        if not headline and time.perf_counter() > self.deadline:
            return "past this config's share of the budget"
        return None


def prepare(name: str, cfg, s: Settings, hf_model):
    """The model ``name`` runs (``hf_model``: the fp16 model shared by the two HF rows, if built) and its info."""
    import optgptq_compile

    if name == "optgptq":
        optgptq_compile.reset_stats()
        model = build_model(cfg, s.device, s.dtype)
        options = s.optgptq_options
        return torch.compile(model, backend="optgptq", options=options), {"dtype": str(s.dtype), "options": options}
    if name in ("hf_static", "hf_eager"):
        return hf_model if hf_model is not None else build_model(cfg, s.device, s.dtype), {"dtype": str(s.dtype)}
    from .tinygemm import replace_linears

    dtype = torch.bfloat16 if s.cuda else s.dtype  # tinygemm's CUDA kernel takes bf16 only
    model = build_model(cfg, s.device, dtype)
    count, error = replace_linears(model.model.layers, 128)
    return model, {"dtype": str(dtype), "linears_replaced": count, "self_check_rel_error": error}


def measure_ab(compiled, batch: int, s: Settings) -> dict:
    """``--ab-env``: the optgptq row again on the same compiled model, with environment variables set that the
    kernels read at launch (e.g. ``OPTGPTQ_PDL=0``): a fresh engine captures its CUDA graphs with them. An A/B in
    one process, the same weights and prompts, the two waves one after the other."""
    saved = {k: os.environ.get(k) for k in s.ab_env}
    os.environ.update(s.ab_env)
    try:
        r = measure_runtime(compiled, batch, s)
    except Exception as exc:
        r = {"error": f"{type(exc).__name__}: {exc}"}
        release_after_error(s.device)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if "error" not in r:
        print(f"{'optgptq ' + ' '.join(f'{k}={v}' for k, v in s.ab_env.items()):13s} batch {batch:3d}: "
              f"{r['decode_tok_s']:9.1f} tok/s decode, TTFT {r['ttft_ms']:8.1f} ms", flush=True)
    return r


def measure(name: str, model, batch: int, s: Settings) -> dict:
    if name == "optgptq":
        return measure_runtime(model, batch, s)
    return measure_hf(model, batch, s, static=name != "hf_eager")


def run_configs(s: Settings, results: dict, checkpoint=lambda: None) -> None:
    """Measure every config of ``s`` into ``results``; ``checkpoint()`` after each measurement (saves the JSON)."""
    import optgptq_compile
    from optgptq_compile.memory import weight_bytes

    cfg = llama7b_config(s.layers, s.tiny)
    budget = Budget(s.budget_s)
    rows = {b: {"batch": b} for b in s.batches}
    results["rows"], results["configs"], results["skipped"] = list(rows.values()), {}, []
    hf_model = None
    for i, name in enumerate(s.rows):
        budget.start_config(len(s.rows) - i)
        why = budget.why_not(headline=True)
        if why:
            results["skipped"].append({"config": name, "batch": None, "why": why})
            print(f"skipped {name}: {why}", flush=True)
            continue
        info: dict = {}
        results["configs"][name] = info
        start = time.perf_counter()
        try:
            model, more = prepare(name, cfg, s, hf_model)
        except Exception as exc:  # one broken config must not cost the others their numbers
            info["error"] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: preparing failed: {info['error']}\n{traceback.format_exc()}", flush=True)
            model = None
        else:
            info.update(more)
            print(f"{name}: ready in {time.perf_counter() - start:.0f} s ({more})", flush=True)
            for j, b in enumerate(s.batches):
                why = budget.why_not(headline=j < HEADLINE_BATCHES)
                if why:
                    results["skipped"].append({"config": name, "batch": b, "why": why})
                    print(f"skipped {name} batch {b}: {why}", flush=True)
                    continue
                start = time.perf_counter()
                try:
                    r = measure(name, model, b, s)
                except Exception as exc:
                    r = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"{name} batch {b}: failed: {r['error']}\n{traceback.format_exc()}", flush=True)
                    release_after_error(s.device)
                rows[b][name] = r
                results["total_s"] = budget.elapsed()
                if "weights_bytes" not in info:  # after the first batch: optgptq compiles (and packs) lazily
                    info["weights_bytes"] = weight_bytes(model)
                if "error" not in r:
                    print(f"{name:13s} batch {b:3d}: {r['decode_tok_s']:9.1f} tok/s decode, TTFT "
                          f"{r['ttft_ms']:8.1f} ms ({time.perf_counter() - start:.0f} s)", flush=True)
                if name == "optgptq":
                    info["stats"] = optgptq_compile.stats()
                    if s.ab_env and "error" not in r:
                        rows[b]["optgptq_ab"] = measure_ab(model, b, s)
                        results["ab_env"] = s.ab_env
                checkpoint()
        # the two HF rows share one fp16 model: keep it while the other one is still to run
        hf_model = None
        if name in ("hf_static", "hf_eager") and model is not None:
            forget_generate_state(model)
            if {"hf_static", "hf_eager"} & set(s.rows[i + 1:]):
                hf_model = model
        del model
        release(s.device)
    results["total_s"] = budget.elapsed()


# --- command line -----------------------------------------------------------------------------------------------
def _rows(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    return names


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return values


def _env_pairs(text: str) -> dict:
    pairs = [p for p in text.split(",") if p]
    if not all("=" in p and p.split("=", 1)[0] for p in pairs):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE[,NAME=VALUE...], got {text!r}")
    return dict(p.split("=", 1) for p in pairs)


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_arguments(ap: argparse.ArgumentParser, default_out: str) -> None:
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU: a smoke test of every row")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --tiny: 2)")
    ap.add_argument("--batches", type=_ints, default=None,
                    help="comma-separated batch sizes, run in this order (default 1,32,8,64; --tiny: 1,4)")
    ap.add_argument("--rows", type=_rows, default=list(ROWS), help=f"configs to run (default {','.join(ROWS)})")
    ap.add_argument("--skip", type=_rows, default=[], help="configs not to run")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512; --tiny: 32)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per request, optgptq (default 128; --tiny: 8)")
    ap.add_argument("--hf-new-tokens", type=int, default=None,
                    help="tokens per request, HF rows (default 32; --tiny: 4)")
    ap.add_argument("--max-prefill-tokens", type=int, default=0,
                    help="optgptq prefill chunk in tokens (default 0: the whole batch in one step)")
    ap.add_argument("--budget-s", type=float, default=420, help="measuring budget in seconds (default 420)")
    ap.add_argument("--out", default=os.environ.get("OUT") or default_out,
                    help=f"output directory (default $OUT, else {default_out})")
    ap.add_argument("--optgptq-options", type=_json_dict, default={},
                    help='backend options over the default {"bits": 4, "group_size": 128, "strict": true}, as JSON')
    ap.add_argument("--ab-env", type=_env_pairs, default={}, metavar="NAME=VALUE[,NAME=VALUE]",
                    help="after each optgptq measurement, measure it again with these environment variables set "
                         "(e.g. OPTGPTQ_PDL=0); stored as rows[...]['optgptq_ab'] in e2e.json")
    ap.add_argument("--plot-only", nargs="+", metavar="JSON", default=None,
                    help="only (re)write the table and plots from these e2e.json files (merged in order)")


def settings_from(args) -> Settings:
    tiny = args.tiny
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    return Settings(
        device=device,
        dtype=torch.float16 if device.type == "cuda" else torch.float32,
        tiny=tiny,
        layers=args.layers or (2 if tiny else 32),
        batches=args.batches or ([1, 4] if tiny else [1, 32, 8, 64]),
        prompt_len=args.prompt_len or (32 if tiny else 512),
        new_tokens=args.new_tokens or (8 if tiny else 128),
        hf_new_tokens=args.hf_new_tokens or (4 if tiny else 32),
        max_prefill_tokens=args.max_prefill_tokens,
        budget_s=args.budget_s,
        rows=[r for r in args.rows if r not in args.skip],
        optgptq_options={"bits": 4, "group_size": 128, "strict": True, **args.optgptq_options},
        ab_env=args.ab_env,
    )


def run(args) -> dict:
    """Measure (or, with ``--plot-only``, reload) and write ``e2e.json``, ``e2e.md`` and the plots."""
    from . import report

    if args.plot_only:
        results = report.merge([report.load(p) for p in args.plot_only])
        report.write(results, args.out, json_too=False)
        return results
    s = settings_from(args)
    import transformers

    from optgptq_compile.runtime.memory import kv_bytes_per_token

    cfg = llama7b_config(s.layers, s.tiny)
    results = {
        "device": torch.cuda.get_device_name() if s.cuda else f"cpu ({platform.processor() or platform.machine()})",
        "gpu": s.cuda, "torch": torch.__version__, "transformers": transformers.__version__,
        "model": {"layers": s.layers, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
                  "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size,
                  "tiny": s.tiny},
        "prompt_len": s.prompt_len, "new_tokens": s.new_tokens, "hf_new_tokens": s.hf_new_tokens,
        "max_prefill_tokens": s.max_prefill_tokens, "batches": s.batches, "budget_s": s.budget_s,
        "kv_bytes_per_token": kv_bytes_per_token(cfg, s.dtype),  # fp16 K and V, all layers (fp32 on the CPU)
    }
    print(f"model: Llama-2-7B shape, {s.layers} layers, hidden {cfg.hidden_size}, on {s.device}; rows {s.rows}; "
          f"batches {s.batches}", flush=True)
    run_configs(s, results, checkpoint=lambda: report.save_json(results, args.out))
    report.write(results, args.out, json_too=True)
    return results


def main(argv: list[str] | None = None, default_out: str = ".") -> int:
    ap = argparse.ArgumentParser(prog="e2e", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, default_out)
    run(ap.parse_args(argv))
    return 0

