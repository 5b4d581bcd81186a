"""The end-to-end benchmark's outputs: ``e2e.json`` -> ``e2e.md`` (Markdown tables) and PNG plots (matplotlib,
optional: without it the plots are skipped, and ``--plot-only e2e.json`` draws them later on another machine)."""

from __future__ import annotations

import json
import os

COLUMNS = ("hf_eager", "hf_static", "int4_tinygemm", "optgptq")  # table order: baselines first
LABELS = {
    "hf_eager": "HF eager",
    "hf_static": "HF static + Inductor",
    "int4_tinygemm": "int4 tinygemm + Inductor",
    "optgptq": "optgptq int4 + paged KV",
}
MERGE_KEYS = ("model", "prompt_len", "new_tokens", "hf_new_tokens", "device")  # runs merged must agree on these


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def merge(runs: list[dict]) -> dict:
    """Several runs of the same setup (e.g. rows split over two GPU calls) as one; later runs win per cell."""
    merged = json.loads(json.dumps(runs[0]))
    for other in runs[1:]:
        for key in MERGE_KEYS:
            if other.get(key) != merged.get(key):
                raise ValueError(f"cannot merge e2e runs with different {key}: {merged.get(key)} vs {other.get(key)}")
        by_batch = {row["batch"]: row for row in merged["rows"]}
        for row in other["rows"]:
            by_batch.setdefault(row["batch"], {"batch": row["batch"]}).update(row)
        merged["rows"] = [by_batch[b] for b in sorted(by_batch)]
        merged["configs"].update(other.get("configs", {}))
        merged["skipped"] = merged.get("skipped", []) + other.get("skipped", [])
        merged["total_s"] = merged.get("total_s", 0) + other.get("total_s", 0)
    measured = {(c, row["batch"]) for row in merged["rows"] for c in COLUMNS if c in row}
    merged["skipped"] = [s for s in merged.get("skipped", [])
                         if not any((s["config"], b) in measured for b in ([s["batch"]] if s["batch"] else
                                                                           [r["batch"] for r in merged["rows"]]))]
    return merged


# --- Markdown ---------------------------------------------------------------------------------------------------
def _value(row: dict, config: str, key: str):
    cell = row.get(config)
    return cell.get(key) if isinstance(cell, dict) else None


def _cell(row: dict, config: str, key: str, fmt) -> str:
    cell = row.get(config)
    if cell is None:
        return "-"
    if "error" in cell:
        return "error"
    value = cell.get(key)
    return "-" if value is None else fmt(value)


def _mib(n: float) -> str:
    n /= 2**20
    return f"{n:.0f}" if n >= 100 else f"{n:.1f}" if n >= 1 else f"{n:.2f}"


def _gib(n: float) -> str:
    n /= 2**30
    return f"{n:.2f}" if n >= 0.1 else f"{n:.3g}"


def _ratio(row: dict, key: str, ours: str, theirs: str) -> str:
    a, b = _value(row, ours, key), _value(row, theirs, key)
    return f"{a / b:.2f}x" if a and b else "-"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    head = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return head + ["| " + " | ".join(cells) + " |" for cells in lines]


def markdown(r: dict) -> str:
    m, rows = r["model"], sorted(r["rows"], key=lambda row: row["batch"])
    configs = r.get("configs", {})
    dtypes = ", ".join(f"{LABELS[c]} {configs[c]['dtype'].replace('torch.', '')}" for c in COLUMNS
                       if "dtype" in configs.get(c, {}))
    out = [
        f"End to end on {r['device']}: Llama-2-7B-shaped random-weight model ({m['layers']} layers, hidden "
        f"{m['hidden']}, {m['heads']} heads / {m['kv_heads']} KV heads, vocab {m['vocab']}), int4 = 4-bit g128. "
        f"Prompts of {r['prompt_len']} random tokens; optgptq generates {r['new_tokens']} tokens per request, the "
        f"HF-generate rows {r['hf_new_tokens']}. torch {r['torch']}, transformers {r['transformers']}. "
        f"Activations: {dtypes}.",
        "",
    ]
    if not r.get("gpu", True):
        out += ["No GPU: HF's static-cache generate does not compile on the CPU, so the \"+ Inductor\" rows ran "
                "eagerly, and optgptq ran its reference kernels: a smoke test of the benchmark, not a measurement.", ""]
    out += [
        "Decode tokens/s (whole batch; higher is better):",
        "",
    ]
    names = [LABELS[c] for c in COLUMNS]
    out += _table(["batch", *names, "optgptq vs HF static", "optgptq vs tinygemm"], [
        [str(row["batch"]), *(_cell(row, c, "decode_tok_s", lambda v: f"{v:.1f}") for c in COLUMNS),
         _ratio(row, "decode_tok_s", "optgptq", "hf_static"), _ratio(row, "decode_tok_s", "optgptq", "int4_tinygemm")]
        for row in rows])
    out += ["", "Time to first token, ms (prefill of the whole batch; lower is better):", ""]
    out += _table(["batch", *names], [[str(row["batch"]), *(_cell(row, c, "ttft_ms", lambda v: f"{v:.1f}")
                                                            for c in COLUMNS)] for row in rows])
    out += ["", "Peak GPU memory, GiB (`max_memory_allocated` over the timed part: weights + KV + activations; "
                f"optgptq's KV holds {r['new_tokens']} new tokens per request, the HF rows' {r['hf_new_tokens']}):",
            ""]
    weights = ["weights", *(_gib(configs[c]["weights_bytes"]) if "weights_bytes" in configs.get(c, {})
                            else "-" for c in COLUMNS)]
    out += _table(["batch", *names], [[str(row["batch"]), *(_cell(row, c, "peak_mem_bytes",
                                                                  _gib) for c in COLUMNS)]
                                      for row in rows] + [weights])
    per_token = r.get("kv_bytes_per_token")
    out += ["", f"KV cache, MiB, for B requests of {r['prompt_len']} + {r['new_tokens']} tokens: optgptq's paged pool "
                "(sized for them), its peak allocated blocks and peak live tokens, against the contiguous cache HF "
                "keeps for the same requests (B x tokens x bytes per token; computed, not measured):", ""]
    out += _table(["batch", "optgptq pool", "optgptq peak allocated", "optgptq peak live", "HF contiguous"], [
        [str(row["batch"]), *(_cell(row, "optgptq", k, _mib) for k in
                              ("kv_pool_bytes", "kv_peak_allocated_bytes", "kv_live_token_bytes")),
         _mib(row["batch"] * (r["prompt_len"] + r["new_tokens"]) * per_token) if per_token else "-"]
        for row in rows])
    out += _notes(r, rows)
    return "\n".join(out) + "\n"


def _notes(r: dict, rows: list[dict]) -> list[str]:
    notes = []
    info = r.get("configs", {})
    stats = info.get("optgptq", {}).get("stats")
    if "options" in info.get("optgptq", {}):
        notes.append(f"optgptq backend options: `{json.dumps(info['optgptq']['options'])}`.")
    if stats:
        graphs = ", ".join(f"batch {row['batch']}: {row['optgptq']['graph_steps']}/{row['optgptq']['decode_steps']}"
                           for row in rows if "decode_steps" in row.get("optgptq", {}))
        notes.append(f"optgptq backend counters: graphs compiled {stats.get('graphs_compiled')}, linears rewritten "
                     f"{stats.get('linear_rewritten')}, attention rewritten {stats.get('attention_rewritten')}, "
                     f"fallbacks {stats.get('fallbacks')}; decode steps replayed as CUDA graphs: {graphs or '-'}.")
    tg = info.get("int4_tinygemm", {})
    if "self_check_rel_error" in tg:
        notes.append(f"int4 tinygemm: {tg['linears_replaced']} linears replaced; first one vs its dequantized "
                     f"weight: relative error {tg['self_check_rel_error']:.2g}.")
    for c in COLUMNS:
        if "error" in info.get(c, {}):
            notes.append(f"{LABELS[c]}: failed to prepare: {info[c]['error']}")
        for row in rows:
            if "error" in row.get(c, {}):
                notes.append(f"{LABELS[c]} batch {row['batch']}: {row[c]['error']}")
    for s in r.get("skipped", []):
        notes.append(f"skipped {LABELS.get(s['config'], s['config'])} "
                     f"{'batch ' + str(s['batch']) if s['batch'] else '(every batch)'}: {s['why']}")
    return ["", *("- " + n for n in notes)] if notes else []


# --- plots ------------------------------------------------------------------------------------------------------
PLOTS = (  # file, field, scale, axis label, log axis
    ("e2e_decode_tok_s.png", "decode_tok_s", 1.0, "decode tokens/s (log scale)", True),
    ("e2e_memory.png", "peak_mem_bytes", 2.0**-30, "peak GPU memory (GiB)", False),
)


def plot(r: dict, out_dir: str) -> list[str]:
    """Grouped bars (x: batch size, one bar per config) per metric; returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipped the plots (pip install matplotlib, or the package's [plots] "
              "extra; then redraw them with --plot-only e2e.json)")
        return []
    rows = sorted(r["rows"], key=lambda row: row["batch"])
    written = []
    for fname, key, scale, ylabel, log in PLOTS:
        series = {c: [_value(row, c, key) for row in rows] for c in COLUMNS}
        series = {c: v for c, v in series.items() if any(x is not None for x in v)}
        if not series:
            print(f"no {key} values (not measured on this device): skipped {fname}")
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / len(series)
        for i, (c, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
            heights = [v * scale if v is not None else 0 for v in values]
            bars = ax.bar(xs, heights, width, label=LABELS[c])
            ax.bar_label(bars, labels=[f"{h:.3g}" if v is not None else "" for h, v in zip(heights, values)],
                         fontsize=7, rotation=90, padding=2)
        ax.set_xticks(range(len(rows)), [str(row["batch"]) for row in rows])
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.margins(y=0.25)
        ax.set_title(f"Llama-2-7B shape ({r['model']['layers']} layers), {r['device']}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def save_json(r: dict, out_dir: str) -> str:
    """e2e.json; also called after every measurement, so a run killed by a time limit leaves what it measured."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "e2e.json")
    with open(path + ".tmp", "w") as f:
        json.dump(r, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return path


def write(r: dict, out_dir: str, json_too: bool) -> list[str]:
    """e2e.json (when measured now), e2e.md and the plots under ``out_dir``; prints the tables; returns paths."""
    paths = [save_json(r, out_dir)] if json_too else []
    os.makedirs(out_dir, exist_ok=True)
    text = markdown(r)
    paths.append(os.path.join(out_dir, "e2e.md"))
    with open(paths[-1], "w") as f:
        f.write(text)
    paths += plot(r, out_dir)
    print("\n" + text)
    print("wrote " + ", ".join(paths) + (f" ({r['total_s']:.0f} s)" if "total_s" in r else ""))
    return paths
