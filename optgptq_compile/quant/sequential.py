"""Sequential GPTQ over any HF causal LM: block by block, each block calibrated on the outputs of the quantized ones.

Generic, no per-model names: the decoder blocks are the largest ``nn.ModuleList`` of same-class modules; block 0's
inputs are captured with a pre-hook that stops the forward; each block's ``nn.Linear`` children are found by
type. With ``true_sequential`` a block's linears are quantized in stages (layers reading the same input tensor
form one stage: q/k/v, then o, then gate/up, then down for Llama), each stage's Hessians built from the outputs of
the stages already quantized, so later layers see (and compensate) the earlier layers' error.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..log import log
from .format import GPTQWeight
from .gptq import GPTQSettings, Hessian, gptq_quantize

# Output heads stay dense (tied to the embedding in many models; the logits layer is the most sensitive one).
DENSE_MODULES = ("lm_head", "embed_out", "output_layer")


class _Stop(Exception):
    """Raised from a hook to end a forward early once the inputs we need were seen."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(fqn, ModuleList) of the decoder blocks: the largest ModuleList whose children all share one class."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[2]:
                best = (name, mod, size)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no nn.ModuleList of identical blocks found to quantize")
    return best[0], best[1]


def eligible_linears(block: nn.Module, bits: int) -> dict[str, nn.Linear]:
    """The block's ``nn.Linear`` children that can be packed at ``bits`` (others stay dense, with a log line)."""
    found = {}
    for name, mod in block.named_modules():
        if not isinstance(mod, nn.Linear) or name.rsplit(".", 1)[-1] in DENSE_MODULES:
            continue
        if (mod.in_features * bits) % 32:
            log.info("GPTQ: %s stays dense: in_features=%d cannot be packed at %d bits", name, mod.in_features, bits)
            continue
        found[name] = mod
    return found


def calibration_batches(calibration: Any, batch_size: int) -> list[torch.Tensor]:
    """A LongTensor [N, S] (split into batches of ``batch_size`` rows) or an iterable of [n, S] / [S] tensors."""
    if isinstance(calibration, torch.Tensor):
        items: Iterable = calibration.split(batch_size)
    else:
        items = calibration
    batches = []
    for item in items:
        t = torch.as_tensor(item)
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.dtype not in (torch.int64, torch.int32) or t.numel() == 0:
            raise ValueError(f"calibration batch must be a non-empty integer tensor [n, S], got {t.dtype} "
                             f"{tuple(t.shape)}")
        batches.append(t.long())
    if not batches:
        raise ValueError("calibration is empty: pass token ids, a LongTensor [N, S]")
    return batches


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[torch.Tensor], device,
                          forward: Callable | None = None) -> list:
    """[(args, kwargs)] block 0 receives for each calibration batch (the forward stops there).

    ``forward(model, ...)`` replaces ``model(...)`` when the instance's own forward must be bypassed (a compiled
    ``model.forward`` while its compile is running)."""
    captured = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                if forward is None:
                    model(input_ids=ids.to(device), use_cache=False)
                else:
                    forward(model, input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError("GPTQ: the model's forward never reached its first decoder block")
    return captured


def _run_block(block: nn.Module, inputs: list) -> list:
    """Run ``block`` on every captured (args, kwargs); returns the next block's (args, kwargs)."""
    outputs = []
    for args, kwargs in inputs:
        try:
            out = block(*args, **kwargs)
        except _Stop:
            outputs.append(None)
            continue
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        if args:
            outputs.append(((hidden, *args[1:]), kwargs))
        else:
            outputs.append(((), {**kwargs, "hidden_states": hidden}))
    return outputs


def _stages(block: nn.Module, linears: dict[str, nn.Linear], sample: tuple, true_sequential: bool) -> list[list[str]]:
    """Linears grouped by the input tensor they read, in call order (all in one stage unless true_sequential)."""
    if not true_sequential:
        return [list(linears)]
    calls: list[tuple[str, torch.Tensor]] = []  # inputs kept alive so their ids stay unique
    hooks = [mod.register_forward_pre_hook(lambda m, a, name=name: calls.append((name, a[0])))
             for name, mod in linears.items()]
    try:
        _run_block(block, [sample])
    finally:
        for h in hooks:
            h.remove()
    stages: list[list[str]] = []
    last_input = None
    seen = set()
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if stages and x is last_input:
            stages[-1].append(name)
        else:
            stages.append([name])
        last_input = x
    stages += [[n] for n in linears if n not in seen]  # never called on this sample: quantized on their own
    return stages


def gptq_sequential(
    model: nn.Module, calibration: Any, settings: GPTQSettings, true_sequential: bool = True,
    batch_size: int = 8, restore: bool = True, forward: Callable | None = None,
) -> dict[str, GPTQWeight]:
    """GPTQ every eligible linear of the decoder blocks of ``model``: {module fqn: GPTQWeight}.

    The weights are dequantized in place while later blocks are calibrated; ``restore=True`` puts the original
    dense values back at the end (the one-call path, which leaves the model untouched).
    """
    device = next(model.parameters()).device
    blocks_name, blocks = find_blocks(model)
    batches = calibration_batches(calibration, batch_size)
    originals: dict[nn.Parameter, torch.Tensor] = {}
    results: dict[str, GPTQWeight] = {}
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = _capture_block_inputs(model, blocks[0], batches, device, forward)
            for index, block in enumerate(tqdm(blocks, desc="GPTQ", unit="block", leave=False)):
                t0 = time.perf_counter()
                linears = eligible_linears(block, settings.bits)
                for stage in _stages(block, linears, inputs[0], true_sequential):
                    hessians = {name: Hessian(linears[name].in_features, device) for name in stage}

                    def collect(mod, args, name, last):
                        hessians[name].add(args[0])
                        if last and true_sequential:
                            raise _Stop  # nothing after this stage's last layer is needed yet

                    hooks = [linears[name].register_forward_pre_hook(
                        lambda m, a, name=name, last=(name == stage[-1]): collect(m, a, name, last))
                        for name in stage]
                    try:
                        _run_block(block, inputs)
                    finally:
                        for h in hooks:
                            h.remove()
                    for name in stage:
                        mod = linears[name]
                        qw, loss = gptq_quantize(mod.weight, hessians[name].matrix, settings)
                        fqn = f"{blocks_name}.{index}.{name}"
                        results[fqn] = qw
                        originals.setdefault(mod.weight, mod.weight.data)
                        mod.weight.data = qw.dequantize(mod.weight.dtype).to(device)
                        log.debug("GPTQ %s: loss %.4g", fqn, loss)
                inputs = _run_block(block, inputs)  # the next block sees this block's quantized outputs
                log.info("GPTQ block %d/%d: %d linears in %.2f s", index + 1, len(blocks), len(linears),
                         time.perf_counter() - t0)
    finally:
        if restore:
            for param, data in originals.items():
                param.data = data
        model.train(was_training)
    log.info("GPTQ: %d linears quantized in %.1f s", len(results), time.perf_counter() - start)
    return results
