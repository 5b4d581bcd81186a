"""Perplexity of a causal LM on token windows: exp(mean next-token negative log-likelihood)."""

from __future__ import annotations

import math

import torch


def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """``windows`` LongTensor [N, S]: each row is scored on its own (S - 1 predicted tokens per row).

    ``model`` is anything returning HF-style output with ``.logits`` [B, S, V] (eager, compiled or quantized).
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a LongTensor [N, S] with S >= 2, got {getattr(windows, 'shape', windows)}")
    device = next((p.device for p in model.parameters()), torch.device("cpu")) if hasattr(model, "parameters") \
        else torch.device("cpu")
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()  # [B, S, V]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(loss)
            count += batch[:, 1:].numel()
    return math.exp(nll / count)
