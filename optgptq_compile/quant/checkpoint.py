"""GPTQ checkpoints in the HF layout: ``save_quantized`` / ``load_quantized``.

A checkpoint is a directory with ``model.safetensors`` (per quantized linear ``<fqn>.qweight/.qzeros/.scales/.g_idx``
[+ ``.bias``], every other tensor dense), ``config.json`` carrying ``quantization_config`` (quant_method "gptq"),
and AutoGPTQ's ``quantize_config.json``. Zero points are written in the old AutoGPTQ convention by default
(``checkpoint_format: "gptq"``: the stored value is zero - 1), which transformers/optimum, AutoGPTQ, GPTQModel and
vLLM all read; ``format="gptq_v2"`` stores the zero itself (GPTQModel's internal format). Loading accepts both,
with or without ``g_idx``, any group size, 2/3/4/8 bits, settings in ``quantization_config`` or
``quantize_config.json``, the format under ``checkpoint_format`` or ``format``, and settings kept under ``meta``.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..log import log
from .api import QUANT_ATTR
from .format import GPTQWeight, default_g_idx, num_groups
from .modules import GPTQLinear
from .packing import SUPPORTED_BITS, pack_cols, unpack_cols

FORMATS = ("gptq", "gptq_v2")
WEIGHTS_NAME = "model.safetensors"
OWN_FILES = ("config.json", "quantize_config.json", WEIGHTS_NAME)
QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and the problem."""


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile(model) wraps it in an OptimizedModule


def _v1_qzeros(name: str, qzeros: torch.Tensor, n: int, bits: int) -> torch.Tensor | None:
    """Real zeros -> AutoGPTQ's stored zero - 1, or None if some zero is 0 (not representable there)."""
    zeros = unpack_cols(qzeros, bits)[:, :n]
    if int(zeros.min()) < 1:
        return None
    return pack_cols(zeros - 1, bits)


def _settings(model: nn.Module, layers: dict[str, GPTQLinear]) -> dict:
    kinds = {(m.bits, m.group_size) for m in layers.values()}
    if len(kinds) != 1:
        raise ValueError(f"save_quantized: the GPTQ layers mix settings {sorted(kinds)}; the format holds one")
    bits, group_size = kinds.pop()
    found = dict(getattr(model, QUANT_ATTR, None) or {})
    acted = any(not torch.equal(m.g_idx.cpu(), default_g_idx(m.in_features, group_size)) for m in layers.values())
    return {"bits": bits, "group_size": group_size, "desc_act": found.get("desc_act", acted),
            "sym": found.get("sym", True), "damp_percent": found.get("damp_percent", 0.01),
            "static_groups": found.get("static_groups", False), "true_sequential": found.get("true_sequential", True)}


def save_quantized(model: nn.Module, path: str | os.PathLike, format: str = "gptq") -> str:
    """Write ``model`` (with ``GPTQLinear`` layers, e.g. from ``quantize``) as a HF GPTQ checkpoint directory.

    Atomic: everything is written to a temporary sibling directory that is renamed to ``path`` at the end, so an
    interrupted save leaves no ``path`` that looks complete. An existing ``path`` is replaced only if it holds
    nothing but files of an earlier save.
    """
    if format not in FORMATS:
        raise ValueError(f"save_quantized: format={format!r}; expected one of {FORMATS}")
    model = _unwrap(model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GPTQLinear)}
    if not layers:
        raise ValueError("save_quantized: the model has no GPTQ layers; run optgptq_compile.quantize(model, ...) first")
    settings = _settings(model, layers)
    bits = settings["bits"]
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}  # tied weights (lm_head = embed_tokens) are written once, like save_pretrained
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    if format == "gptq":
        converted = {}
        for name, m in layers.items():
            v1 = _v1_qzeros(name, m.qzeros.cpu(), m.out_features, bits)
            if v1 is None:
                log.warning("save_quantized: %s has a zero point 0, which the v1 'gptq' format cannot store; "
                            "writing checkpoint_format 'gptq_v2' instead", name)
                format = "gptq_v2"
                break
            converted[f"{name}.qzeros"] = v1
        else:
            tensors.update(converted)
    quant_config = {"quant_method": "gptq", **settings, "checkpoint_format": format, "format": format,
                    "lm_head": False, "meta": {"quantizer": ["optgptq_compile"]}}

    path = os.fspath(path)
    if os.path.exists(path):
        extra = sorted(set(os.listdir(path)) - set(OWN_FILES)) if os.path.isdir(path) else [path]
        if extra:
            raise ValueError(f"save_quantized: {path} exists and holds other files {extra[:5]}; choose a new path")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        config = model.config.to_dict()
        config["quantization_config"] = quant_config
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True, default=str)
        with open(os.path.join(tmp, "quantize_config.json"), "w") as f:
            json.dump(quant_config, f, indent=2)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "ckpt"))
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("save_quantized: %d GPTQ layers, %d-bit g%d, format %s -> %s", len(layers), bits,
             settings["group_size"], format, path)
    return path


# ---------------------------------------------------------------------------------------------------- loading


def read_quant_config(path: str) -> dict:
    """The quantization settings of a checkpoint, from ``config.json`` and/or ``quantize_config.json``."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{path}: no config.json (not a HF model directory, or an interrupted save)")
    with open(config_file) as f:
        config = json.load(f)
    merged = {}
    qc_file = os.path.join(path, "quantize_config.json")
    if os.path.isfile(qc_file):
        with open(qc_file) as f:
            merged.update(json.load(f))
    merged.update(config.get("quantization_config") or {})
    if not merged:
        raise CheckpointError(f"{path}: no quantization_config in config.json and no quantize_config.json")
    meta = merged.get("meta") or {}

    def get(key, default=None):
        return merged[key] if merged.get(key) is not None else meta.get(key, default)

    settings = {
        "quant_method": get("quant_method", "gptq"),
        "bits": get("bits"),
        "group_size": get("group_size", -1),
        "desc_act": bool(get("desc_act", False)),
        "sym": bool(get("sym", True)),
        "format": get("checkpoint_format") or get("format") or "gptq",
    }
    if str(settings["quant_method"]).lower() != "gptq":
        raise CheckpointError(f"{path}: quant_method {settings['quant_method']!r} is not 'gptq'")
    if settings["bits"] not in SUPPORTED_BITS:
        raise CheckpointError(f"{path}: bits={settings['bits']!r} is unsupported; supported {SUPPORTED_BITS}")
    gs = settings["group_size"]
    if not isinstance(gs, int) or isinstance(gs, bool) or not (gs == -1 or gs > 0):
        raise CheckpointError(f"{path}: group_size={gs!r} must be -1 or a positive int")
    if settings["format"] not in FORMATS:
        raise CheckpointError(f"{path}: checkpoint format {settings['format']!r} is unsupported; expected {FORMATS}")
    settings["config"] = {k: v for k, v in config.items() if k != "quantization_config"}
    return settings


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    index = os.path.join(path, f"{WEIGHTS_NAME}.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors weights found")
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: weight file {name} listed in the index is missing")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types on truncated/corrupt files
            raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from exc
    return tensors


def _expect(name: str, t: torch.Tensor | None, shape: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
    if t is None:
        raise CheckpointError(f"tensor {name} is missing")
    if tuple(t.shape) != shape:
        raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
    if dtype is not None and t.dtype != dtype:
        raise CheckpointError(f"tensor {name} has dtype {t.dtype}, expected {dtype}")
    return t


def build_layer(prefix: str, linear: nn.Linear, tensors: dict, bits: int, group_size: int, fmt: str) -> GPTQLinear:
    """Check one layer's tensors against the ``nn.Linear`` they replace and convert them to real zero points."""
    n, k = linear.out_features, linear.in_features
    if (k * bits) % 32:
        raise CheckpointError(f"{prefix}: in_features={k} cannot be packed at {bits} bits")
    groups = num_groups(k, group_size)
    qweight = _expect(f"{prefix}.qweight", tensors.pop(f"{prefix}.qweight"), (k * bits // 32, n), torch.int32)
    qzeros = _expect(f"{prefix}.qzeros", tensors.pop(f"{prefix}.qzeros", None), (groups, -(-n * bits // 32)),
                     torch.int32)
    scales = _expect(f"{prefix}.scales", tensors.pop(f"{prefix}.scales", None), (groups, n))
    if not scales.is_floating_point():
        raise CheckpointError(f"tensor {prefix}.scales has dtype {scales.dtype}, expected a floating-point type")
    g_idx = tensors.pop(f"{prefix}.g_idx", None)
    if g_idx is None:
        g_idx = default_g_idx(k, group_size)
    else:
        _expect(f"{prefix}.g_idx", g_idx, (k,))
        if g_idx.is_floating_point() or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise CheckpointError(f"tensor {prefix}.g_idx holds values outside [0, {groups})")
        g_idx = g_idx.to(torch.int32)
    if fmt == "gptq":  # stored zero - 1 (AutoGPTQ); readers add 1 back
        zeros = unpack_cols(qzeros, bits)[:, :n] + 1
        if int(zeros.max()) > 2**bits - 1:
            raise CheckpointError(f"tensor {prefix}.qzeros: a stored zero point {2**bits - 1} means {2**bits} in the "
                                  f"'gptq' format, which {bits}-bit codes cannot hold (an AutoGPTQ overflow)")
        qzeros = pack_cols(zeros, bits)
    bias = tensors.pop(f"{prefix}.bias", None)
    if bias is not None:
        _expect(f"{prefix}.bias", bias, (n,))
    return GPTQLinear(GPTQWeight(qweight, qzeros, scales, g_idx, bits, group_size), bias)


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> nn.Module:
    """A HF causal LM with ``GPTQLinear`` layers from a GPTQ checkpoint directory (ours or a community one).

    The model is built from ``config.json`` with transformers (no network); ``dtype`` (default: the config's, or
    fp32) applies to the dense tensors, ``scales`` keep their stored dtype.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    q = read_quant_config(path)
    cfg_dict = dict(q["config"])
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise CheckpointError(f"{path}/config.json has no model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    if dtype is None:
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, stored) if isinstance(stored, str) else (stored or torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _read_tensors(path)

    bits, group_size, fmt = q["bits"], q["group_size"], q["format"]
    prefixes = sorted(name[: -len(".qweight")] for name in tensors if name.endswith(".qweight"))
    if not prefixes:
        raise CheckpointError(f"{path}: no '<layer>.qweight' tensors: this is not a GPTQ checkpoint")
    for prefix in prefixes:
        try:
            linear = model.get_submodule(prefix)
        except AttributeError:
            raise CheckpointError(f"tensor {prefix}.qweight: the {model_type} model has no module {prefix}") from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"tensor {prefix}.qweight: module {prefix} is a {type(linear).__name__}, "
                                  "not an nn.Linear")
        model.set_submodule(prefix, build_layer(prefix, linear, tensors, bits, group_size, fmt))

    expected = model.state_dict()
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # older checkpoints save this computed buffer
        if name not in expected:
            raise CheckpointError(f"tensor {name} does not belong to the {model_type} model (unexpected)")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}")
    dense = {k: v for k, v in tensors.items() if k in expected}
    result = model.load_state_dict(dense, strict=False)
    required = {n for n, _ in model.named_parameters()}  # deduplicated: a tied lm_head is its embedding
    missing = sorted(set(result.missing_keys) & required)
    if missing:
        raise CheckpointError(f"tensor {missing[0]} is missing ({len(missing)} model tensors missing in all)")
    setattr(model, QUANT_ATTR, {"bits": bits, "group_size": group_size, "desc_act": q["desc_act"],
                                "sym": q["sym"]})
    log.info("load_quantized: %d GPTQ layers (%d-bit g%d, %s) from %s", len(prefixes), bits, group_size, fmt, path)
    return model.to(device).eval()
