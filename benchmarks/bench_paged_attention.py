"""Paged decode attention and KV write on the GPU: correctness at full size, then timings side by side in one run.

    PYTHONPATH=. python benchmarks/bench_paged_attention.py [--quick] [--sweep] [--out DIR]

Decode (Sq = 1), GQA 32 query / 8 KV heads, head 128, fp16, block 16, batch 1/8/32/64 x context 512..8192, with and
without ALiBi. Every sequence of a row has the full context; block tables are random permutations of the pool.
Columns:
  * ``ours``: ``optgptq::paged_attention_triton`` (the shipped ``pick_config``; ``splits`` = KV splits it chose);
  * ``sdpa``: ``F.scaled_dot_product_attention`` over a contiguous [B, Hkv, L, D] cache, the faster of
    ``enable_gqa=True`` and K/V pre-expanded to 32 heads (expansion not timed); with ALiBi a materialized fp16
    bias [1, 32, 1, L] is passed as ``attn_mask``;
  * ``gather+sdpa``: ``torch_kv_gather`` of K and V, then SDPA (what a model without the paged_kv rewrite runs);
  * ``reference``: ``torch_paged_attention`` (gather, fp32 math; skipped where it would need > 20 GB);
  * ``floor``: K + V bytes read / 3.0 TB/s (the H100's measured copy rate); ``TB/s`` = those bytes / our time.
Timing: ``triton.testing.do_bench`` median of a CUDA graph replaying 20 calls (5 for the gather paths; more when
there are more copies), cycling over enough copies of the pools to exceed the 50 MB L2 2.5 times (decode reads
each layer's cache once per step), divided by the number of calls. Also: a split-count sweep on the target
shapes (--sweep adds tiles / warps / stages), kv_write throughput (decode step B=64, prefill 2048 tokens) against
the reference's ``index_copy_``, one causal prefill (S=2048) against SDPA, and the two Triton ops through Inductor
(``torch.compile``), checking that the pool is written in place (no pool-sized buffer in the generated code).
Correctness first: fp16 (and bf16) cases at full size against ``torch_paged_attention``, kv_write bit-exact.
Writes bench_paged_attention.json and .md to --out (default $OUT, else "."). ``TRITON_INTERPRET=1 ... --smoke``
runs the whole script on a CPU with tiny shapes (a check of the script, not of speed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script from anywhere
from timing import time_graph  # noqa: E402  (benchmarks/timing.py: the shared CUDA-graph timing)

BW = 3.0e12  # bytes/s, device-to-device copy measured on the H100 (DESIGN.md section 5)
L2 = 50e6
HQ, HKV, D, BLOCK = 32, 8, 128, 16
BATCHES = (1, 8, 32, 64)
CONTEXTS = (512, 2048, 4096, 8192)
MEM_LIMIT = 20e9  # bytes a baseline may allocate
SPLIT_CASES = ((1, 4096), (1, 8192), (8, 4096), (32, 4096))  # (batch, context): the targets and their neighbours
CHECKS = [(8, 32, 8, 128, 1, 512), (1, 32, 8, 128, 1, 512), (4, 28, 4, 80, 1, 256), (3, 32, 32, 64, 1, 256),
          (4, 32, 8, 128, 300, 32), (2, 28, 4, 80, 77, 16), (16, 32, 8, 128, 3, 128)]  # (B, Hq, Hkv, D, Sq, blocks)
KV_WRITE = (64 * 8192 // BLOCK, 64, 2048)  # pool blocks (64 sequences of 8192 tokens), decode and prefill tokens
PREFILL = 2048
DEV = "cuda"


def smoke_sizes():
    """--smoke: the whole script on a CPU in the Triton interpreter (TRITON_INTERPRET=1), tiny shapes, wall-clock
    timings -- checks the script, not the kernels' speed."""
    global HQ, HKV, D, BATCHES, CONTEXTS, SPLIT_CASES, CHECKS, KV_WRITE, PREFILL, DEV
    HQ, HKV, D, BATCHES, CONTEXTS, DEV = 8, 2, 32, (1, 2), (32, 80), "cpu"
    SPLIT_CASES = ((1, 64),)
    CHECKS = [(2, 8, 2, 32, 1, 4), (2, 7, 1, 80, 5, 2)]
    KV_WRITE, PREFILL = (64, 4, 40), 48


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def _sms():
    return torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 4


def slopes(h):
    """BLOOM's ALiBi slopes for h heads (a power of two here)."""
    return torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], dtype=torch.float32, device=DEV)


def try_time(fns, replays=20):
    """time_graph, or NaN (with the reason printed) when the baseline cannot run this case."""
    try:
        return time_graph(fns, replays)
    except Exception as exc:
        print("  baseline failed:", type(exc).__name__, str(exc)[:120], flush=True)
        _sync()
        return float("nan")


def copies_for(nbytes):
    """Copies of the K/V that together exceed the L2 2.5 times (64 copies of batch 1 x 512 tokens = 134 MB)."""
    return max(1, min(64, math.ceil(2.5 * L2 / nbytes)))


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


class Case:
    """``copies`` pools holding B sequences of L tokens each (same shuffled block tables), and the same K/V as
    contiguous [B, Hkv, L, D] caches for SDPA."""

    def __init__(self, b, length, copies, dtype=torch.float16, seed=0):
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.b, self.length = b, length
        nblk = b * length // BLOCK
        self.tables = torch.randperm(nblk, device=DEV, generator=g).view(b, length // BLOCK).int()
        self.ctx = torch.full((b,), length, dtype=torch.int32, device=DEV)
        self.pools = [(torch.randn(nblk, BLOCK, HKV, D, device=DEV, generator=g, dtype=dtype),
                       torch.randn(nblk, BLOCK, HKV, D, device=DEV, generator=g, dtype=dtype))
                      for _ in range(copies)]
        self.q = torch.randn(b, HQ, 1, D, device=DEV, generator=g, dtype=dtype)
        self.scale = 1 / math.sqrt(D)

    def contiguous(self, pool):
        """[B, Hkv, L, D] K and V of one pool, in token order."""
        t = torch.arange(self.length, device=DEV)
        slots = (self.tables.long()[:, t // BLOCK] * BLOCK + t % BLOCK)  # [B, L]
        return tuple(c.view(-1, HKV, D)[slots].permute(0, 2, 1, 3).contiguous() for c in pool)

    @property
    def kv_bytes(self):
        return 2 * self.b * self.length * HKV * D * 2


def alibi_mask(length, dtype=torch.float16):
    """slope * (key - query) for the query at position length - 1: [1, Hq, 1, L]."""
    pos = torch.arange(length, device=DEV) - (length - 1)
    return (slopes(HQ)[:, None] * pos[None, :]).to(dtype)[None, :, None, :]


# ------------------------------------------------------------------------------------------------------------------


def check_correctness(out):
    """Full-size checks against the reference: uniform and ragged contexts (splits past short contexts), every
    GQA ratio the launcher packs, ALiBi, prefill with left padding; and kv_write."""
    from optgptq_compile.lowering import triton_paged_attention as T
    from optgptq_compile.lowering.paged_attention import torch_kv_write, torch_paged_attention

    rows = []
    g = torch.Generator(device=DEV).manual_seed(1)
    f16, bf16 = torch.float16, torch.bfloat16
    cases = [(c, alibi, True, f16) for c in CHECKS for alibi in (False, True)]
    prefill = next(c for c in CHECKS if c[4] > 1)  # a non-causal prefill; bf16 decode and prefill
    cases += [(prefill, True, False, f16)]
    if DEV == "cuda":  # (bf16 tl.dot is wrong in triton 3.9's interpreter: --smoke skips it)
        cases += [(CHECKS[0], True, True, bf16), (prefill, False, True, bf16)]
    tol = {f16: 5e-3, bf16: 2e-2}  # P is rounded to the input dtype before P @ V
    for (b, hq, hkv, d, sq, width), alibi, causal, dtype in cases:
        nblk = b * width + 5
        kc = torch.randn(nblk, BLOCK, hkv, d, device=DEV, dtype=dtype, generator=g)
        vc = torch.randn(nblk, BLOCK, hkv, d, device=DEV, dtype=dtype, generator=g)
        tables = torch.randperm(nblk, device=DEV, generator=g)[: b * width].view(b, width).int()
        lens = torch.randint(1, width * BLOCK + 1, (b,), device=DEV, generator=g, dtype=torch.int32)
        lens[0] = width * BLOCK  # one full table
        if sq > 1:
            lens[-1] = max(1, sq // 3)  # a prompt shorter than the batch's longest: left padding rows
        q = torch.randn(b, hq, sq, d, device=DEV, dtype=dtype, generator=g)
        sl = slopes(hq) if alibi else None
        y = torch.ops.optgptq.paged_attention_triton(q, kc, vc, tables, lens, sl, causal, 1 / math.sqrt(d))
        ref = torch_paged_attention(q.float(), kc.float(), vc.float(), tables, lens, sl, causal, 1 / math.sqrt(d))
        e = rel_err(y, ref)
        cfg = T.pick_config(b, hkv, sq, hq // hkv, d, width * BLOCK, q.dtype, _sms(), torch.version.hip is not None)
        rows.append(dict(b=b, hq=hq, hkv=hkv, d=d, sq=sq, max_context=width * BLOCK, alibi=alibi, causal=causal,
                         dtype=str(dtype), rel_err=e, ok=e < tol[dtype] and bool(torch.isfinite(y).all()),
                         splits=cfg["SPLITS"]))
    worst = max(r["rel_err"] for r in rows)
    print(f"paged_attention correctness: {len(rows)} cases, worst rel err {worst:.2e}", flush=True)
    # kv_write with padding slots, against the reference on a copy of the pool
    nblk, t = KV_WRITE[0], KV_WRITE[2]
    kc = torch.randn(nblk, BLOCK, HKV, D, device=DEV, dtype=torch.float16, generator=g)
    vc = torch.randn_like(kc)
    k = torch.randn(t, HKV, D, device=DEV, dtype=torch.float16, generator=g)
    v = torch.randn_like(k)
    slots = torch.randperm(nblk * BLOCK, device=DEV, generator=g)[:t]
    slots[torch.rand(t, device=DEV, generator=g) < 0.1] = -1
    kr, vr = kc.clone(), vc.clone()
    torch_kv_write(k, v, kr, vr, slots)
    torch.ops.optgptq.kv_write_triton(k, v, kc, vc, slots)
    kv_ok = bool(torch.equal(kc, kr) and torch.equal(vc, vr))
    print(f"kv_write correctness: {'exact' if kv_ok else 'MISMATCH'}", flush=True)
    out["correctness"] = dict(paged_attention=rows, kv_write_exact=kv_ok)
    assert kv_ok and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def decode_table(out, batches, contexts):
    from optgptq_compile.lowering import triton_paged_attention as T
    from optgptq_compile.lowering.paged_attention import torch_kv_gather, torch_paged_attention

    sms = _sms()
    rows = out["decode"] = []  # filled as measured: a failure part-way keeps the rows before it
    for b, length in itertools.product(batches, contexts):
        kv_bytes = 2 * b * length * HKV * D * 2
        if kv_bytes * 6 > MEM_LIMIT:  # pool + contiguous + expanded copies
            print(f"skip B={b} L={length}: {kv_bytes / 1e9:.1f} GB of K/V", flush=True)
            continue
        case = Case(b, length, copies_for(kv_bytes))
        contig = [case.contiguous(p) for p in case.pools]
        for alibi in (False, True):
            sl = slopes(HQ) if alibi else None
            mask = alibi_mask(length) if alibi else None
            row = dict(b=b, context=length, alibi=alibi, kv_mb=kv_bytes / 1e6,
                       splits=T.pick_config(b, HKV, 1, HQ // HKV, D, length, torch.float16, sms)["SPLITS"])
            ours = [lambda p=p: torch.ops.optgptq.paged_attention_triton(case.q, p[0], p[1], case.tables, case.ctx,
                                                                        sl, True, case.scale) for p in case.pools]
            y = ours[0]()
            kc, vc = contig[0]
            ref_sdpa = F.scaled_dot_product_attention(case.q, kc.repeat_interleave(HQ // HKV, dim=1),
                                                      vc.repeat_interleave(HQ // HKV, dim=1), attn_mask=mask,
                                                      scale=case.scale)
            row["err_vs_sdpa"] = rel_err(y, ref_sdpa)
            del ref_sdpa
            row["ours_us"] = time_graph(ours)
            row["sdpa_gqa_us"] = try_time([lambda c=c: F.scaled_dot_product_attention(
                case.q, c[0], c[1], attn_mask=mask, scale=case.scale, enable_gqa=True) for c in contig])
            row["sdpa_expanded_us"] = float("nan")
            if kv_bytes * 4 * len(contig) < MEM_LIMIT / 2:
                expanded = [tuple(t.repeat_interleave(HQ // HKV, dim=1) for t in c) for c in contig]
                row["sdpa_expanded_us"] = try_time([lambda c=c: F.scaled_dot_product_attention(
                    case.q, c[0], c[1], attn_mask=mask, scale=case.scale) for c in expanded])
                del expanded
            best = min(("sdpa_gqa_us", "sdpa_expanded_us"), key=lambda k: row[k] if row[k] == row[k] else 1e30)
            row["sdpa_us"], row["sdpa_form"] = row[best], best[5:-3]
            row["gather_sdpa_us"] = time_graph([lambda p=p: F.scaled_dot_product_attention(
                case.q, torch_kv_gather(p[0], case.tables, case.ctx, length),
                torch_kv_gather(p[1], case.tables, case.ctx, length), attn_mask=mask, scale=case.scale,
                enable_gqa=True) for p in case.pools], replays=5)
            ref_bytes = 2 * b * HQ * length * D * 4 * 2.5  # fp32 K/V expanded to Hq, gathered copies, scores
            row["reference_us"] = float("nan")
            if ref_bytes < MEM_LIMIT:
                row["reference_us"] = try_time([lambda p=p: torch_paged_attention(
                    case.q, p[0], p[1], case.tables, case.ctx, sl, True, case.scale) for p in case.pools[:2]],
                    replays=2)
            row["floor_us"] = kv_bytes / BW * 1e6
            row["ours_tbs"] = kv_bytes / row["ours_us"] / 1e6
            row["sdpa_tbs"] = kv_bytes / row["sdpa_us"] / 1e6
            row["x_sdpa"] = row["sdpa_us"] / row["ours_us"]
            rows.append(row)
            print(f"B={b:3d} L={length:5d} alibi={alibi!s:5s} ours {row['ours_us']:8.1f} us ({row['splits']:3d} "
                  f"splits, {row['ours_tbs']:.2f} TB/s)  sdpa {row['sdpa_us']:8.1f} ({row['sdpa_form']}, "
                  f"{row['sdpa_tbs']:.2f} TB/s)  gather+sdpa {row['gather_sdpa_us']:8.1f}  reference "
                  f"{row['reference_us']:9.1f}  floor {row['floor_us']:7.1f}  x_sdpa {row['x_sdpa']:.2f}  "
                  f"err {row['err_vs_sdpa']:.1e}", flush=True)
        del case, contig
        torch.cuda.empty_cache()


def split_sweep(out, tiles=False):
    """Time the picked tile config at several split counts (cheap); with ``tiles``, other tiles/warps/stages too."""
    from optgptq_compile.lowering import triton_paged_attention as T

    sms = _sms()
    rows = []
    for b, length in SPLIT_CASES:
        kv_bytes = 2 * b * length * HKV * D * 2
        case = Case(b, length, copies_for(kv_bytes))
        picked = T.pick_config(b, HKV, 1, HQ // HKV, D, length, torch.float16, sms)
        configs = [dict(picked, SPLITS=s) for s in sorted({1, 2, 4, 8, 16, 32, 64, 128, picked["SPLITS"]})]
        if tiles:
            configs += [dict(BLOCK_M=16, BLOCK_N=bn, num_warps=nw, num_stages=ns, SPLITS=s)
                        for bn in (32, 64, 128) for nw in (4, 8) for ns in (2, 3, 4)
                        for s in sorted({max(1, picked["SPLITS"] // 2), picked["SPLITS"], picked["SPLITS"] * 2})]
        best = None
        for c in configs:
            fns = [lambda p=p, c=c: T.paged_attention_fwd(case.q, p[0], p[1], case.tables, case.ctx, None, True,
                                                          case.scale, config=c) for p in case.pools]
            try:
                us = time_graph(fns)
            except Exception as exc:  # e.g. a tile that does not fit shared memory
                print("skip", c, type(exc).__name__, str(exc)[:80])
                continue
            rows.append(dict(b=b, context=length, cfg=c, us=us, tbs=kv_bytes / us / 1e6, picked=c == picked))
            if best is None or us < best[0]:
                best = (us, c)
        print(f"SPLITS B={b} L={length}: picked {picked['SPLITS']} splits "
              f"{next(r['us'] for r in rows if r['b'] == b and r['context'] == length and r['picked']):.1f} us; "
              f"best {best[0]:.1f} us {best[1]}", flush=True)
        del case
        torch.cuda.empty_cache()
    out["split_sweep"] = rows


def kv_write_bench(out):
    from optgptq_compile.lowering.paged_attention import torch_kv_write

    rows = []
    nblk, decode, prefill = KV_WRITE  # a pool for 64 sequences of 8192 tokens (2.1 GB of K and V)
    kc = torch.randn(nblk, BLOCK, HKV, D, device=DEV, dtype=torch.float16)
    vc = torch.randn_like(kc)
    for name, t in ((f"decode step B={decode}", decode), (f"prefill {prefill} tokens", prefill)):
        k = torch.randn(t, HKV, D, device=DEV, dtype=torch.float16)
        v = torch.randn_like(k)
        slots = [torch.randperm(nblk * BLOCK, device=DEV)[:t] for _ in range(8)]
        moved = 2 * 2 * t * HKV * D * 2  # K and V, read and written
        ours = time_graph([lambda s=s: torch.ops.optgptq.kv_write_triton(k, v, kc, vc, s) for s in slots])
        ref = time_graph([lambda s=s: torch_kv_write(k, v, kc, vc, s) for s in slots])
        rows.append(dict(case=name, tokens=t, ours_us=ours, reference_us=ref, ours_gbs=moved / ours / 1e3,
                         reference_gbs=moved / ref / 1e3))
        print(f"kv_write {name:20s} ours {ours:7.1f} us ({moved / ours / 1e3:6.0f} GB/s)  reference {ref:7.1f} us",
              flush=True)
    del kc, vc
    _empty_cache()
    out["kv_write"] = rows


def prefill_bench(out):
    """One causal prefill, S=2048, GQA 32/8, against SDPA (flash) over contiguous K/V."""
    length = PREFILL
    case = Case(1, length, 1)
    q = torch.randn(1, HQ, length, D, device=DEV, dtype=torch.float16)
    kc, vc = case.contiguous(case.pools[0])
    p = case.pools[0]
    rows = []
    for alibi in (False, True):
        sl = slopes(HQ) if alibi else None
        y = torch.ops.optgptq.paged_attention_triton(q, p[0], p[1], case.tables, case.ctx, sl, True, case.scale)
        ours = time_graph([lambda: torch.ops.optgptq.paged_attention_triton(q, p[0], p[1], case.tables, case.ctx, sl,
                                                                            True, case.scale)], replays=5)
        sdpa = time_graph([lambda: F.scaled_dot_product_attention(q, kc, vc, is_causal=True, scale=case.scale,
                                                                  enable_gqa=True)], replays=5)
        err = rel_err(y, F.scaled_dot_product_attention(q, kc, vc, is_causal=True, scale=case.scale,
                                                        enable_gqa=True)) if not alibi else float("nan")
        rows.append(dict(s=length, alibi=alibi, ours_us=ours, sdpa_flash_no_bias_us=sdpa, err=err))
        print(f"prefill S={length} alibi={alibi!s:5s} ours {ours:8.1f} us  sdpa causal (no bias) {sdpa:8.1f} us",
              flush=True)
    out["prefill"] = rows


def inductor_check(out):
    """kv_write_triton + paged_attention_triton under torch.compile (Inductor), as the runtime's decode graphs run
    them: same output as eager, the pool mutated in place (no pool-sized buffer allocated), time vs eager."""
    from torch._inductor.utils import run_and_get_code

    b, length = 32, 4096
    case = Case(b, length, 1)
    kc, vc = case.pools[0]
    k = torch.randn(b, HKV, D, device=DEV, dtype=torch.float16)
    v = torch.randn_like(k)
    slots = case.tables.long()[:, -1] * BLOCK + BLOCK - 1  # each sequence's last token (a decode step's write)

    def step(q, k, v, kc, vc, slots, tables, ctx):
        torch.ops.optgptq.kv_write_triton(k, v, kc, vc, slots)
        return torch.ops.optgptq.paged_attention_triton(q, kc, vc, tables, ctx, None, True, 1 / math.sqrt(D))

    compiled = torch.compile(step, fullgraph=True)
    args = (case.q, k, v, kc, vc, slots, case.tables, case.ctx)
    eager = step(*args)
    y, codes = run_and_get_code(compiled, *args)
    code = "\n".join(codes)
    shape = f"({kc.shape[0]}, {BLOCK}, {HKV}, {D})"
    pool_alloc = any(shape in line and ("empty_strided" in line or "clone" in line) for line in code.splitlines())
    res = dict(same_as_eager=bool(torch.equal(y, eager)), pool_sized_buffer_in_code=pool_alloc,
               eager_us=time_graph([lambda: step(*args)]), compiled_us=time_graph([lambda: compiled(*args)]))
    print(f"inductor: same as eager {res['same_as_eager']}, pool-sized buffer in generated code "
          f"{res['pool_sized_buffer_in_code']}, eager {res['eager_us']:.1f} us, compiled {res['compiled_us']:.1f} us",
          flush=True)
    out["inductor"] = res


def markdown(out) -> str:
    lines = [f"# Paged attention on {out['device']} (torch {out['torch']}, triton {out['triton']})", ""]
    c = out.get("correctness")
    if c:
        worst = max(r["rel_err"] for r in c["paged_attention"])
        lines += [f"Correctness: {len(c['paged_attention'])} full-size cases vs the reference, worst relative error "
                  f"{worst:.2e}; kv_write exact: {c['kv_write_exact']}.", ""]
    lines += ["## Decode (Sq=1, GQA 32/8, head 128, fp16, block 16)", "",
              "| B | context | ALiBi | ours us | splits | SDPA contiguous us (form) | gather+SDPA us | reference us "
              "| floor us | ours TB/s | SDPA TB/s | x SDPA |", "| " + " | ".join(["---"] * 12) + " |"]
    for r in out.get("decode", []):
        lines.append(f"| {r['b']} | {r['context']} | {'yes' if r['alibi'] else 'no'} | {r['ours_us']:.1f} | "
                     f"{r['splits']} | {r['sdpa_us']:.1f} ({r['sdpa_form']}) | {r['gather_sdpa_us']:.1f} | "
                     f"{r['reference_us']:.1f} | {r['floor_us']:.1f} | {r['ours_tbs']:.2f} | {r['sdpa_tbs']:.2f} | "
                     f"{r['x_sdpa']:.2f} |")
    sweep = out.get("split_sweep", [])
    if sweep:
        lines += ["", "## Split sweep (no ALiBi)", "", "| B | context | config | us | TB/s | picked |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in sweep:
            lines.append(f"| {r['b']} | {r['context']} | {r['cfg']} | {r['us']:.1f} | {r['tbs']:.2f} | "
                         f"{'yes' if r['picked'] else ''} |")
    if out.get("kv_write"):
        lines += ["", "## kv_write (Hkv 8, head 128, fp16; bytes = K+V read + written)", "",
                  "| case | ours us | ours GB/s | reference us |", "| --- | --- | --- | --- |"]
        for r in out["kv_write"]:
            lines.append(f"| {r['case']} | {r['ours_us']:.1f} | {r['ours_gbs']:.0f} | {r['reference_us']:.1f} |")
    if out.get("prefill"):
        lines += ["", "## Prefill (B=1, S=2048, causal, GQA 32/8)", "", "| ALiBi | ours us | SDPA flash (no bias) us |",
                  "| --- | --- | --- |"]
        for r in out["prefill"]:
            lines.append(f"| {'yes' if r['alibi'] else 'no'} | {r['ours_us']:.1f} | {r['sdpa_flash_no_bias_us']:.1f} |")
    if out.get("inductor"):
        r = out["inductor"]
        lines += ["", f"Inductor (kv_write + paged attention, B=32, context 4096): same as eager "
                  f"{r['same_as_eager']}, pool-sized buffer in generated code {r['pool_sized_buffer_in_code']}, "
                  f"eager {r['eager_us']:.1f} us, compiled {r['compiled_us']:.1f} us."]
    return "\n".join(lines) + "\n"


def save(out, directory):
    with open(os.path.join(directory, "bench_paged_attention.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    with open(os.path.join(directory, "bench_paged_attention.md"), "w") as f:
        f.write(markdown(out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 1 and 32, contexts 512 and 4096; no split sweep")
    ap.add_argument("--sweep", action="store_true", help="also sweep tiles / warps / stages on the split cases")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for the JSON and Markdown results")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # CPU + TRITON_INTERPRET=1: script check
    a = ap.parse_args(argv)
    if a.smoke:
        smoke_sizes()
    elif not torch.cuda.is_available():
        print("bench_paged_attention: needs a CUDA or ROCm GPU (torch.cuda.is_available() is False). The kernels are "
              "tested on a CPU by tests/lowering/test_triton_paged_attention.py (Triton interpreter).", file=sys.stderr)
        return 2
    import triton

    import optgptq_compile  # noqa: F401  (registers the ops)

    out = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)", torch=torch.__version__,
               triton=triton.__version__)
    print(out, flush=True)
    t0 = time.time()
    check_correctness(out)
    stages = [lambda: decode_table(out, (1, 32) if a.quick else BATCHES, (512, 4096) if a.quick else CONTEXTS)]
    if not a.quick:
        stages += [lambda: split_sweep(out, tiles=a.sweep)]
    stages += [lambda: kv_write_bench(out), lambda: prefill_bench(out)]
    if DEV == "cuda":  # Inductor compiles user Triton kernels for GPUs only
        stages += [lambda: inductor_check(out)]
    os.makedirs(a.out, exist_ok=True)
    for stage in stages:
        try:
            stage()
        except Exception as exc:  # keep what was measured; report the failure
            out.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")
            print("FAILED:", type(exc).__name__, exc, flush=True)
            traceback.print_exc(limit=-8)
        save(out, a.out)  # after every stage: a run cut short by a time limit keeps what it measured
    print(markdown(out))
    print(f"done in {time.time() - t0:.0f} s")
    return 1 if out.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
