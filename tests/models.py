"""Small random-init HF models and a recording backend shared by the tests."""

from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

import optgptq_compile.backend as backend


def tiny_llama(heads: int = 4, kv_heads: int = 2, layers: int = 2, hidden: int = 64, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """GQA 4/2 by default; hidden 64 keeps K a multiple of 32 so every bit width packs."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_bloom(heads: int = 4, layers: int = 2, hidden: int = 64, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> BloomForCausalLM:
    """BLOOM (ALiBi, fused interleaved QKV, tied lm_head); heads=6 exercises non-power-of-two ALiBi slopes."""
    torch.manual_seed(seed)
    cfg = BloomConfig(vocab_size=128, hidden_size=hidden, n_layer=layers, n_head=heads, pad_token_id=0,
                      eos_token_id=1, bos_token_id=2)
    return BloomForCausalLM(cfg).to(dtype).eval()


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``ref`` in dB."""
    ref, test = ref.double(), test.double()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - test).pow(2).mean().clamp_min(1e-30)))


@contextlib.contextmanager
def recording():
    """Collect every graph the optgptq backend finishes (after all passes), in compile order."""
    graphs: list[fx.GraphModule] = []
    original = backend._runner

    def record(gm, example_inputs, ctx):
        graphs.append(gm)
        return original(gm, example_inputs, ctx)

    backend._runner = record
    try:
        yield graphs
    finally:
        backend._runner = original


def call_targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def gptq_linear_node(graph: fx.Graph, root: torch.nn.Module, x: fx.Node, weight, out_example: torch.Tensor,
                     bits: int = 4) -> fx.Node:
    """A hand-built Dynamo-style ``optgptq::gptq_linear`` call on ``x``: ``weight`` (a packed ``GPTQWeight``) becomes
    buffers of ``root`` read by get_attr nodes; the node's example value is ``out_example``."""
    names = ("qw", "qz", "sc", "gi")
    for name, t in zip(names, (weight.qweight, weight.qzeros, weight.scales, weight.g_idx)):
        root.register_buffer(name, t)
    consts = [graph.get_attr(n) for n in names]
    y = graph.call_function(torch.ops.optgptq.gptq_linear.default, (x, *consts, None, bits, weight.group_size))
    y.meta["example_value"] = out_example
    return y
