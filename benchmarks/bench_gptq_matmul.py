"""GPTQ matmul on the GPU: correctness at full size, then timings beside bf16 cuBLAS, torch's int4 tinygemm and the
bandwidth floor (bytes / 3.0 TB/s, the H100's measured copy rate).

    PYTHONPATH=. python benchmarks/bench_gptq_matmul.py [--sweep] [--quick] [--out DIR]

Timing: ``triton.testing.do_bench`` (median) of a CUDA graph that replays 20 calls, each on a different copy of the
weights (enough copies to exceed the 50 MB L2, so a 4-bit 7B weight is not served from cache), divided by 20.
``eager`` columns time the same through Python launches (launch overhead included).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script from anywhere
from timing import time_graph  # noqa: E402  (benchmarks/timing.py: the shared CUDA-graph timing)
import triton

from optgptq_compile.lowering import triton_gptq_linear as T
from optgptq_compile.lowering.gptq_linear import torch_gptq_linear

BW = 3.0e12  # bytes/s, device-to-device copy measured on the H100 (DESIGN.md section 5)
L2 = 50e6
SHAPES = {  # (N, K) = (out, in) features
    "7B qkvo 4096x4096": (4096, 4096),
    "7B up 11008x4096": (11008, 4096),
    "7B down 4096x11008": (4096, 11008),
    "70B qo 8192x8192": (8192, 8192),
    "70B up 28672x8192": (28672, 8192),
    "70B down 8192x28672": (8192, 28672),
}
MS = (1, 4, 16, 64, 256, 2048)


def random_gptq(n, k, bits=4, group=128, dtype=torch.bfloat16, act_order=False, seed=0):
    """Random packed weights (every bit pattern is a valid GPTQ value), scales ~ 1/(16 * sqrt(K))."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    groups = 1 if group == -1 else -(-k // group)
    qweight = torch.randint(-2**31, 2**31 - 1, (k * bits // 32, n), generator=g, device="cuda", dtype=torch.int32)
    qzeros = torch.randint(-2**31, 2**31 - 1, (groups, -(-n * bits // 32)), generator=g, device="cuda",
                           dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=g, device="cuda") + 0.5).mul(2.0 / (2**bits * math.sqrt(k))).to(dtype)
    size = k if group == -1 else group
    g_idx = (torch.arange(k, device="cuda") // size).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g, device="cuda")]
    return dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx)


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def time_eager(fns):
    it = itertools.cycle(fns)
    ms = triton.testing.do_bench(lambda: next(it)(), warmup=25, rep=200, return_mode="median")
    return ms * 1e3


def copies_for(nbytes):
    return max(2, min(16, math.ceil(2.5 * L2 / nbytes)))


def tinygemm_weight(w, n, k, group):
    """Pack our random 4-bit weight for torch._weight_int4pack_mm (values and scales only matter for timing)."""
    from optgptq_compile.quant.packing import unpack_rows

    q = unpack_rows(w["qweight"], 4)[:k].t().contiguous()  # [N, K] ints 0..15
    packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # [N, K/2]
    packed = torch._convert_weight_to_int4pack(packed_u8, 8)
    sz = torch.stack([w["scales"], torch.zeros_like(w["scales"])], dim=-1).contiguous()  # [G, N, 2]
    return packed, sz


def check_correctness(out):
    """Every supported format through the shipped heuristics: bits x group x act-order x M, against the reference."""
    rows = []
    worst = 0.0
    for bits, (group, act), m in itertools.product((2, 3, 4, 8), ((32, False), (128, True), (-1, False)),
                                                   (1, 5, 16, 300)):
        n, k = 1000, 2048 + 64  # N not a multiple of 64; K ends in a partial 128-group
        w = random_gptq(n, k, bits, group, torch.float16, act)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        b = torch.randn(n, device="cuda", dtype=torch.float16)
        y = torch.ops.optgptq.gptq_linear_triton(x, w["qweight"], w["qzeros"], w["scales"], w["g_idx"], b, bits,
                                                 group)
        ref = torch_gptq_linear(x.float(), w["qweight"], w["qzeros"], w["scales"], w["g_idx"], b.float(), bits)
        e = rel_err(y, ref)
        worst = max(worst, e)
        rows.append(dict(bits=bits, group=group, act_order=act, m=m, rel_err=e))
    print(f"correctness sweep: {len(rows)} cases, worst rel err {worst:.2e} (fp16 rounding ~5e-4)")
    assert worst < 2e-3, rows
    out["correctness"] = rows


def candidates(m):
    """Configs the sweep times for one M (the shipped heuristic, pick_config, was set from these results)."""
    out = []
    if m == 1:
        # gemv (see gptq_gemv_kernel). Session 5's pipelined loop (cp.async, 2 warps, 256 columns) and its sweep
        # (1/2/4/8 warps, 2-4 stages, 2-16 programs per SM) are in RESULTS.md; `benchmarks/sass_loop.py
        # --candidates` gives each config's registers, warps per SM and SASS instructions per weight.
        # Session 7 (benchmarks/gemv_probe.py, one run): the register-prefetch loop, us at up / down / 4096^2 / qkv /
        # gate-up: 1 warp, 128 columns, 8 per SM (shipped) 13.7 13.8 8.9 14.0 22.6; 2 warps, 256 columns, 4 per SM
        # 14.3 15.0 9.0 15.1 22.7; 6 per SM 14.3 14.5 9.0 14.7 22.2; 8 per SM 14.2 15.0 9.0 15.0 25.0; 4 warps, 512
        # columns 14.2 15.0 9.0 14.9 24.9; with cp.async on top (2 stages) 14.4 15.4 9.1 15.5 23.0; the session-5
        # pipelined loop (2 warps, 3 stages) 16.3 15.0 10.1 15.1 24.0.
        base = dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=128, BLOCK_K=64, num_warps=1, num_stages=1, SPLIT_K=0, PER_SM=8,
                    ACC_ROWS=False)
        for extra in (
            dict(),  # the shipped default, every row in-thread
            dict(PER_SM=6),
            dict(PER_SM=12),
            dict(num_stages=2),  # cp.async pipelining on top of the register prefetch
            dict(BLOCK_N=256, num_warps=2, PER_SM=4),  # 2-warp programs, 4 columns a thread
            dict(BLOCK_N=256, num_warps=2, PER_SM=6),
            dict(BLOCK_N=512, num_warps=4, PER_SM=4),
            dict(num_warps=2, ACC_ROWS=True),  # 2 warps split the rows of 128 columns
            dict(REDUCE_ROWS=32),  # one reduce round trip up to 32 splits
        ):
            out.append({**base, **extra})
    if 1 < m <= 64:
        # gptq_dot_kernel (weights as the dot's 64-row side, one BLOCK_M row block up to 64 rows); SPLIT_K=0: the
        # launcher's split count and twice that (K splits do not recompile). sm90 SASS of each (Triton 3.6, main
        # loop instructions per weight per lane / registers, no spills) in the comments.
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        if bm == 16:
            # half-word dequant (MAGIC16, session 6; words with MAGIC16=0). H100 session 6
            # (benchmarks/data/wdot_probe_session6_*.json), M=16 us at up / down / 4096^2 / qkv / gate-up: 128x64 s3
            # 28.7 / 30.3 / 16.9 / 35.2 / 53.9; 256x64 s3 33.1 / 34.6 / 24.5 / 30.9 / 46.7; 64x64 37.0 / 35.0 /
            # 15.7 / 39.0 / 66.8; 128x128 s3 31.2 / 33.1 / 18.8 (run 2); words 16x256x64 s4 40.2 / 42.2 / 29.6.
            shapes = ((128, 64, 4, 3),  # 6.75 / 114: the default below N = 12288
                      (128, 64, 4, 4),  # 6.77 / 114: deeper pipeline
                      (256, 64, 4, 3),  # 5.77 / 185: the default from N = 12288 (fused projections)
                      (64, 64, 4, 3),  # 9.41 / 71: more column tiles, fewer splits
                      (256, 64, 8, 3),  # 6.72 / 118: two warpgroups
                      (128, 128, 4, 3))  # 5.27 / 132: 32 half-words a column
            out += [dict(KERNEL="wdot", BLOCK_M=16, BLOCK_N=256, BLOCK_K=64, num_warps=4, num_stages=4, SPLIT_K=0,
                         MAGIC16=0)]  # words through shared memory (the session-5 default): 4.48 / 220
        elif bm < 64:
            shapes = ((128, 128, 4, 3),  # 4.44 / 170: the default
                      (128, 128, 4, 4),  # 4.45 / 171: deeper pipeline
                      (256, 128, 4, 3),  # 3.96 / 251: the fixed per-tile costs over twice the weights
                      (256, 64, 4, 4),  # 4.48 / 220
                      (256, 128, 8, 3),  # 4.42 / 174: two warpgroups, fewer programs, fewer splits
                      (64, 128, 4, 4))  # 6.16 / 100: more column tiles, fewer splits
        else:
            shapes = ((128, 128, 4, 3),  # 5.11 / 255: the default
                      (64, 128, 4, 4),  # 6.41 / 229
                      (256, 128, 8, 3),  # 4.89 / 255
                      (128, 128, 4, 4))  # deeper pipeline
        out += [dict(KERNEL="wdot", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns, SPLIT_K=0)
                for bn, bk, nw, ns in shapes]
        if bm == 64:  # 32-row blocks (4.53 / 231): two programs per column tile read its weights (one from L2)
            out += [dict(KERNEL="wdot", BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3, SPLIT_K=0)]
    if m >= 64:
        out += [dict(KERNEL="dequant", BLOCK_K=bk, BLOCK_N=bn, num_warps=4, num_stages=1)
                for bk, bn in ((64, 128), (128, 64))]
    if m >= 128:
        out += [dict(KERNEL="dot", BLOCK_M=128, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=ns,
                     SPLIT_K=1) for bn in (64, 128) for ns in (3, 4)]
    return out


def sweep(out, ms):
    """Tune: time candidate configs on the 7B MLP shapes (M = 1 and 16 on both, other M on the up projection),
    print the best per (shape, M)."""
    res = []
    cases = [(s, m) for s in list(SHAPES.items())[1:3] for m in (1, 16) if m in ms]
    if 1 in ms:  # what a 7B decode step runs at M=1: o (4096x4096) and the fused q/k/v and gate/up projections
        cases += [(s, 1) for s in (list(SHAPES.items())[0], ("7B qkv fused 12288x4096", (12288, 4096)),
                                   ("7B gate/up fused 22016x4096", (22016, 4096)))]
    cases += [(list(SHAPES.items())[1], m) for m in (4, 64, 256, 2048) if m in ms]
    for (name, (n, k)), m in cases:
        w = [random_gptq(n, k, seed=i) for i in range(copies_for(k * n // 2))]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        best = None
        for c in candidates(m):
            splits = [c.get("SPLIT_K", 1)]  # 0 with PER_SM: the launcher's count for that many programs per SM
            if c.get("SPLIT_K") == 0 and "PER_SM" not in c:
                base = T._split_k(m, n, k, c, 132)
                splits = sorted({max(1, int(base * f)) for f in (1, 2)})
            for sk in splits:
                cc = dict(c, SPLIT_K=sk) if "SPLIT_K" in c else dict(c)
                try:
                    fns = [lambda w=wi, cc=cc: T.gptq_matmul(x, w["qweight"], w["qzeros"], w["scales"],
                                                              w["g_idx"], None, 4, 128, config=cc) for wi in w]
                    y = fns[0]()
                    ref = torch_gptq_linear(x, w[0]["qweight"], w[0]["qzeros"], w[0]["scales"], w[0]["g_idx"],
                                            None, 4)
                    err = rel_err(y, ref)
                    us = time_graph(fns)
                except Exception as exc:  # a config that does not compile (shared memory) is just skipped
                    print("skip", cc, type(exc).__name__, str(exc)[:100])
                    continue
                if err > 1e-2:
                    print("WRONG", cc, err)
                    continue
                res.append(dict(shape=name, m=m, cfg=cc, us=us))
                print(f"   {us:7.1f} us {cc}", flush=True)
                if best is None or us < best[0]:
                    best = (us, cc)
        print(f"SWEEP {name} M={m}: best {best[0]:.1f} us {best[1]}", flush=True)
        top = sorted((r for r in res if r["shape"] == name and r["m"] == m), key=lambda r: r["us"])[:5]
        for r in top:
            print(f"   {r['us']:7.1f} {r['cfg']}")
    out["sweep"] = res


def table(out, shapes, ms):
    rows = []
    for (name, (n, k)), m in itertools.product(shapes.items(), ms):
        wbytes = k * n // 2 + (k // 128) * n * 2 * 1.25  # packed ints + scales + zeros
        ncopy = copies_for(wbytes)
        ws = [random_gptq(n, k, seed=i) for i in range(ncopy)]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w0 = ws[0]
        y = T.gptq_matmul(x, w0["qweight"], w0["qzeros"], w0["scales"], w0["g_idx"], None, 4, 128)
        ref = torch_gptq_linear(x, w0["qweight"], w0["qzeros"], w0["scales"], w0["g_idx"], None, 4)
        err = rel_err(y, ref)
        assert err < 1e-2, (name, m, err)
        tri = [lambda w=w: T.gptq_matmul(x, w["qweight"], w["qzeros"], w["scales"], w["g_idx"], None, 4, 128)
               for w in ws]
        row = dict(shape=name, m=m, err=err, cfg=T.pick_config(m, n, k, 4, 128))
        row["triton_us"] = time_graph(tri)
        row["triton_eager_us"] = time_eager(tri) if m == 1 else float("nan")
        del ref
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(2 * n * k))]
        row["bf16_us"] = time_graph([lambda d=d: F.linear(x, d) for d in dense])
        del dense
        try:
            tg = [tinygemm_weight(w, n, k, 128) for w in ws]
            row["tinygemm_us"] = time_graph([lambda p=p: torch._weight_int4pack_mm(x, p[0], 128, p[1]) for p in tg])
            del tg
        except Exception as exc:
            row["tinygemm_us"] = float("nan")
            print("tinygemm failed:", type(exc).__name__, exc)
        floor_bytes = wbytes + 2 * m * (k + n)
        row["floor_us"] = floor_bytes / BW * 1e6
        row["tflops"] = 2 * m * n * k / row["triton_us"] / 1e6
        rows.append(row)
        print(f"{name:22s} M={m:5d} triton {row['triton_us']:8.1f} (eager {row['triton_eager_us']:7.1f})  "
              f"bf16 {row['bf16_us']:8.1f}  tinygemm {row['tinygemm_us']:8.1f}  floor {row['floor_us']:6.1f}  "
              f"x_bf16 {row['bf16_us'] / row['triton_us']:5.2f}  x_tiny {row['tinygemm_us'] / row['triton_us']:5.2f} "
              f"err {err:.1e}", flush=True)
        torch.cuda.empty_cache()
    out["table"] = rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="7B shapes only")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--sweep-m", default="1,16,4,64,256,2048", help="comma-separated M values the sweep tunes")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    out = {}
    t0 = time.time()
    check_correctness(out)
    if a.sweep:
        sweep(out, [int(m) for m in a.sweep_m.split(",")])
    if not a.no_table:
        shapes = dict(list(SHAPES.items())[:3]) if a.quick else SHAPES
        table(out, shapes, MS)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_gptq_matmul.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
