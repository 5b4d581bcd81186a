"""Opt-GQA: merge the K/V heads of an attention into fewer KV heads, in place on an HF model.

Two ways to merge the heads of one group (the ``g = Hkv / n`` consecutive KV heads whose query heads become one
GQA group):

- ``"mean"``: average the K and V projection rows of the group (Ainslie et al. 2023, "GQA", section 2.2).
- ``"aligned"`` (data-aware): heads of one group compute K/V in unrelated bases, so their mean throws much of
  each away. Any invertible map ``B_h`` on head h's K (or V) can be undone in its query (or output) projection,
  so we look for one merged projection ``W`` and per-head maps with ``W_h ~= B_h W``: the best such fit is a
  truncated SVD of the stacked projections, weighted by the second moment of the attention input on calibration
  tokens (``E[x x^T]``) and by how much each head's error matters downstream (query energy for K, the output
  projection for V). ``B_h`` is folded into the query rows (K side) or the output-projection columns (V side).
  With RoPE, ``B_h`` must commute with the rotations: per frequency pair it is a complex scalar, and the fit
  is a rank-1 complex SVD per pair. With calibration tokens the layers are fitted in order on the activations
  of the already merged model (as GPTQ does), and each output projection is then refitted by least squares so
  that it maps the merged attention outputs to what the original attention fed it on those tokens.

Llama-family models become true GQA models with ``n`` KV heads (config and projections change; the HF cache
then holds ``n`` heads). BLOOM's attention module needs as many KV heads as query heads, so its fused
``query_key_value`` keeps its shape and holds the merged heads re-expanded (``B_h W``): the same function as the
GQA model, ready for a runtime that stores ``n`` heads.
"""

from __future__ import annotations

import torch
from torch import nn

METHODS = ("mean", "aligned")
DAMP = 1e-4  # relative Tikhonov damping of E[x x^T] and the output weightings (numerical safety only)


def check_kv_heads(kv_heads: int, hkv: int, hq: int) -> int:
    if not isinstance(kv_heads, int) or kv_heads <= 0 or hkv % kv_heads or hq % kv_heads:
        raise ValueError(f"kv_heads={kv_heads!r} must be a positive divisor of the model's {hkv} KV heads")
    return hkv // kv_heads


def mean_merge(w: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """[Hkv*D, ...] projection rows (or bias) -> [n*D, ...]: the mean over each group of Hkv/n heads."""
    return w.reshape(n, -1, d, *w.shape[1:]).mean(1).reshape(n * d, *w.shape[1:])


def expand_heads(w: torch.Tensor, g: int, d: int) -> torch.Tensor:
    """[n*D, ...] -> [n*g*D, ...]: each merged head repeated for the g heads of its group."""
    n = w.shape[0] // d
    return w.reshape(n, 1, d, *w.shape[1:]).expand(n, g, d, *w.shape[1:]).reshape(n * g * d, *w.shape[1:])


def _psd_sqrt(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^1/2, M^-1/2) of a symmetric PSD matrix, damped."""
    m = m + DAMP * m.diagonal().mean().clamp_min(1e-12) * torch.eye(m.shape[0], dtype=m.dtype)
    evals, evecs = torch.linalg.eigh(m)
    return (evecs * evals.sqrt()) @ evecs.T, (evecs * evals.rsqrt()) @ evecs.T


def fit_group(ws: list[torch.Tensor], chol: torch.Tensor, weights: list[torch.Tensor]):
    """Best ``W_h ~= B_h W`` for a group: ws [D, K], chol [K, K] (E[x x^T] = L L^T), weights [D, D] PSD.

    Minimises sum_h E || M_h^1/2 (W_h - B_h W) x ||^2 with a rank-D SVD. Returns (W [D, K], [B_h [D, D]]).
    """
    d = ws[0].shape[0]
    roots = [_psd_sqrt(m) for m in weights]
    z = torch.cat([r @ w @ chol for (r, _), w in zip(roots, ws)])  # [g*D, K]
    u, s, vh = torch.linalg.svd(z, full_matrices=False)
    w = torch.linalg.solve_triangular(chol.T, (s[:d, None] * vh[:d]).T, upper=True).T  # (S V^T) L^-1: [D, K]
    return w, [inv @ u[i * d:(i + 1) * d, :d] for i, (_, inv) in enumerate(roots)]


def fit_group_rope(ws: list[torch.Tensor], chol: torch.Tensor, energy: torch.Tensor):
    """RoPE version of ``fit_group`` for K: per frequency pair (rows p and p + D/2, HF's rotate_half layout) the
    heads are complex rows, fitted by one complex row times a complex scalar per head (what commutes with RoPE).

    energy [g, D/2]: E|q_pair|^2 of the queries reading each head. Returns (W [D, K], c [g, D/2] complex).
    """
    d = ws[0].shape[0]
    half = d // 2
    rows = torch.stack([torch.complex(w[:half], w[half:]) for w in ws])  # [g, D/2, K]
    lam = energy.clamp_min(1e-12).sqrt()  # [g, D/2]
    z = (lam[..., None] * rows).permute(1, 0, 2) @ chol.to(rows.dtype)  # [D/2, g, K]
    u, s, vh = torch.linalg.svd(z, full_matrices=False)
    top = s[:, :1, None] * vh[:, :1]  # [D/2, 1, K]
    merged = torch.linalg.solve_triangular(chol.T.to(rows.dtype), top[:, 0].T, upper=True).T  # [D/2, K]
    c = u[:, :, 0].T / lam  # [g, D/2]
    return torch.cat([merged.real, merged.imag]), c


def _augment(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """[out, K] weight and bias as one [out, K+1] matrix acting on [x; 1]."""
    return w if b is None else torch.cat([w, b[:, None]], 1)


def input_moments(x_moment: torch.Tensor, x_mean: torch.Tensor, with_bias: bool) -> torch.Tensor:
    """Cholesky factor of E[x x^T] (of [x; 1] when the projections have a bias), damped."""
    c = x_moment
    if with_bias:
        k = c.shape[0]
        c = torch.cat([torch.cat([c, x_mean[:, None]], 1), torch.cat([x_mean, torch.ones(1, dtype=c.dtype)])[None]])
        assert c.shape == (k + 1, k + 1)
    c = c + DAMP * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    return torch.linalg.cholesky(c)


class _Moments:
    """Running E[x x^T] and E[x] of a layer's attention input over calibration tokens (a forward pre-hook)."""

    def __init__(self):
        self.sum, self.mean_sum, self.count = None, None, 0

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        self.sum = x.T @ x if self.sum is None else self.sum + x.T @ x
        self.mean_sum = x.sum(0) if self.mean_sum is None else self.mean_sum + x.sum(0)
        self.count += x.shape[0]

    def result(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.count:
            return torch.eye(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        return self.sum / self.count, self.mean_sum / self.count


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = [(n, m) for n, m in model.named_modules() if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    found += [(n, m) for n, m in model.named_modules() if hasattr(m, "query_key_value") and hasattr(m, "dense")]
    if not found:
        raise ValueError("convert_gqa: no Llama-style (q/k/v/o_proj) or BLOOM (query_key_value) attention found")
    return found


@torch.no_grad()
def _first_layer_inputs(model: nn.Module, layer: nn.Module, calibration, batch_size: int = 4) -> list:
    """(args, kwargs) of the first decoder layer for every calibration batch (the rest of the model is skipped);
    the same capture GPTQ's sequential calibration uses."""
    from .quant.sequential import _capture_block_inputs

    batches = [part for ids in ([calibration] if isinstance(calibration, torch.Tensor) else list(calibration))
               for part in ids.split(batch_size)]
    return _capture_block_inputs(model, layer, batches, next(model.parameters()).device)


@torch.no_grad()
def _run_layer(layer: nn.Module, inputs: list, hooked: nn.Module | None = None,
               captured: nn.Module | None = None) -> tuple[list, _Moments, torch.Tensor | None]:
    """Run one decoder layer on every batch. Returns the next layer's inputs, E[x x^T] of ``hooked``'s input and
    every token's input to ``captured`` (the output projection) as [tokens, Hq*D]."""
    moments, seen = _Moments(), []
    hooks = [hooked.register_forward_pre_hook(moments)] if hooked is not None else []
    if captured is not None:
        hooks.append(captured.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())))
    outputs = []
    try:
        for args, kwargs in inputs:
            out = layer(*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            if args:
                outputs.append(((hidden, *args[1:]), kwargs))
            else:
                outputs.append(((), {**kwargs, "hidden_states": hidden}))
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, moments, torch.cat(seen) if seen else None


def refit_output(out_proj: nn.Linear, weight: torch.Tensor, original: torch.Tensor, merged: torch.Tensor) -> None:
    """Least-squares output projection O' = argmin ||O' a_merged - O a_original||^2 over calibration tokens:
    the attention outputs changed by the merge are mapped back to what the original layer fed its output
    projection (damped normal equations, in float64). ``weight``: the output projection before the merge."""
    a_m, a_o = merged.double(), original.double()
    gram = a_m.T @ a_m
    gram += DAMP * 10 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = weight.double()
    with torch.no_grad():
        out_proj.weight.copy_(torch.linalg.solve(gram, (a_m.T @ a_o) @ w.T).T.to(out_proj.weight.dtype))


def _parent(model: nn.Module, name: str) -> nn.Module:
    """The decoder layer that holds the attention module ``name``."""
    return model.get_submodule(name.rsplit(".", 1)[0])


def _convert_llama(attn: nn.Module, cfg, n: int, method: str, chol) -> None:
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = attn.head_dim
    g, rep = hkv // n, hq // hkv  # KV heads per merged head, query heads per original KV head
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    dtype = k.weight.dtype
    with torch.no_grad():
        if method == "mean":
            new_k = [mean_merge(k.weight.double(), n, d), None if k.bias is None else mean_merge(k.bias.double(), n, d)]
            new_v = [mean_merge(v.weight.double(), n, d), None if v.bias is None else mean_merge(v.bias.double(), n, d)]
        else:
            wq, wk, wv = (_augment(p.weight.double(), None if p.bias is None else p.bias.double()) for p in (q, k, v))
            wo = o.weight.double()  # [hidden, Hq*D]
            merged_k, merged_v = [], []
            for grp in range(n):
                heads = range(grp * g, (grp + 1) * g)
                qrows = {h: [wq[j * d:(j + 1) * d] for j in range(h * rep, (h + 1) * rep)] for h in heads}
                energy = torch.stack([sum(((r @ chol) ** 2).sum(1) for r in qrows[h]) for h in heads])  # [g, D]
                energy = energy[:, : d // 2] + energy[:, d // 2:]  # per frequency pair
                wk_m, c = fit_group_rope([wk[h * d:(h + 1) * d] for h in heads], chol, energy)
                out_w = [sum(wo[:, j * d:(j + 1) * d].T @ wo[:, j * d:(j + 1) * d] for j in range(h * rep, (h + 1) * rep))
                         for h in heads]
                wv_m, bs = fit_group([wv[h * d:(h + 1) * d] for h in heads], chol, out_w)
                for t, h in enumerate(heads):
                    for j in range(h * rep, (h + 1) * rep):
                        rows = wq[j * d:(j + 1) * d]
                        z = torch.complex(rows[: d // 2], rows[d // 2:]) * c[t].conj()[:, None]
                        wq[j * d:(j + 1) * d] = torch.cat([z.real, z.imag])
                        wo[:, j * d:(j + 1) * d] = wo[:, j * d:(j + 1) * d] @ bs[t]
                merged_k.append(wk_m)
                merged_v.append(wv_m)
            wk_all, wv_all = torch.cat(merged_k), torch.cat(merged_v)
            split = (lambda w, p: [w[:, :-1], w[:, -1]] if p.bias is not None else [w, None])
            new_k, new_v = split(wk_all, k), split(wv_all, v)
            qw, qb = split(wq, q)
            q.weight.copy_(qw.to(dtype))
            if qb is not None:
                q.bias.copy_(qb.to(dtype))
            o.weight.copy_(wo.to(dtype))
        for name, (w, b) in (("k_proj", new_k), ("v_proj", new_v)):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=dtype)
            lin.weight.copy_(w.to(dtype))
            if b is not None:
                lin.bias.copy_(b.to(dtype))
            setattr(attn, name, lin)
    attn.num_key_value_groups = hq // n


def _convert_bloom(attn: nn.Module, heads: int, n: int, method: str, chol) -> None:
    lin = attn.query_key_value
    d = attn.head_dim
    g = heads // n
    with torch.no_grad():
        w = _augment(lin.weight.double(), lin.bias.double()).reshape(heads, 3, d, -1)  # interleaved [H, q/k/v, D]
        for slot in (1, 2):
            if method == "mean":
                rows = expand_heads(mean_merge(w[:, slot].reshape(heads * d, -1), n, d), g, d)
                w[:, slot] = rows.reshape(heads, d, -1)
                continue
            for grp in range(n):
                hs = range(grp * g, (grp + 1) * g)
                if slot == 1:  # K: weight by each head's own queries
                    weights = [w[h, 0] @ chol @ chol.T @ w[h, 0].T for h in hs]
                else:  # V: weight by each head's output-projection columns
                    dense = attn.dense.weight.double()
                    weights = [dense[:, h * d:(h + 1) * d].T @ dense[:, h * d:(h + 1) * d] for h in hs]
                merged, bs = fit_group([w[h, slot] for h in hs], chol, weights)
                for t, h in enumerate(hs):
                    w[h, slot] = bs[t] @ merged  # re-expanded: same shape, GQA function
        w = w.reshape(heads * 3 * d, -1)
        lin.weight.copy_(w[:, :-1].to(lin.weight.dtype))
        lin.bias.copy_(w[:, -1].to(lin.bias.dtype))


def convert_gqa(model: nn.Module, kv_heads: int, calibration=None, method: str = "aligned",
                sequential: bool = True, refit: bool = True) -> nn.Module:
    """Merge every attention's KV heads into ``kv_heads`` groups (Opt-GQA), in place; returns the model.

    ``calibration``: LongTensor [N, S] of token ids (or an iterable of such) for ``method="aligned"``; without
    it the fit weights every input direction equally. ``sequential``: fit layer l on the activations of the
    already merged layers (GPTQ-style) rather than of the original model. ``refit``: then refit each output
    projection by least squares to what the original attention fed it (calibrated "aligned" only). Call before
    ``torch.compile``.
    """
    if method not in METHODS:
        raise ValueError(f"convert_gqa: method={method!r} must be one of {METHODS}")
    cfg = model.config
    is_bloom = hasattr(cfg, "n_head") and not hasattr(cfg, "num_key_value_heads")
    hq = cfg.n_head if is_bloom else cfg.num_attention_heads
    hkv = hq if is_bloom else cfg.num_key_value_heads
    check_kv_heads(kv_heads, hkv, hq)
    if kv_heads == hkv:
        return model
    modules = _attention_modules(model)
    calibrated = method == "aligned" and calibration is not None
    # GPTQ-style sequential calibration: layer l is fitted on the activations of the already merged layers < l
    inputs = _first_layer_inputs(model, _parent(model, modules[0][0]), calibration) if calibrated else None
    for name, attn in modules:
        chol, outputs, original = None, None, None
        proj = attn.query_key_value if is_bloom else attn.k_proj
        out_proj = attn.dense if is_bloom else attn.o_proj
        if method == "aligned":
            k = cfg.hidden_size
            moment, mean = torch.eye(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
            if calibrated:
                outputs, moments, original = _run_layer(_parent(model, name), inputs, proj, out_proj)
                out_weight = out_proj.weight.detach().clone()
                moment, mean = moments.result(k)
            chol = input_moments(moment.cpu(), mean.cpu(), is_bloom or proj.bias is not None)
        if is_bloom:
            _convert_bloom(attn, hq, kv_heads, method, chol)
        else:
            _convert_llama(attn, cfg, kv_heads, method, chol)
        if calibrated and refit:
            refit_output(out_proj, out_weight, original, _run_layer(_parent(model, name), inputs, None, out_proj)[2])
        if calibrated:
            inputs = _run_layer(_parent(model, name), inputs)[0] if sequential else outputs
    if not is_bloom:
        cfg.num_key_value_heads = kv_heads
    model.optgptq_gqa = {"kv_heads": kv_heads, "method": method, "original_kv_heads": hkv}
    return model
