"""Time of qlower's fusion stage vs ExecuTorch's own Vulkan pattern pass, same run.

Model: a tiny Llama-style decoder (token embedding, RMSNorm, SDPA attention,
SwiGLU MLP, LM head), quantized with the default scheme (qta8a_qga4w).
Both sides start from copies of one edge program:

* qlower: ``qlower.fuse.run_fusion`` on the edge program;
* stock:  ExecuTorch's ``replace_all_fusable_subgraphs`` (the pattern pass
  its Vulkan backend runs inside ``preprocess``) on the same edge program.

Also reports, from the stock pass vs ours, the number of
``choose_qparams_affine`` nodes left (the per-token activation
quantizations the GPU computes at run time).

    python benchmarks/fuse_bench.py [--layers 2] [--dim 128] [--repeat 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.w, self.eps = torch.nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w


class Block(torch.nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            torch.nn.Linear(d, d, bias=False) for _ in range(4)
        )
        self.gate_proj = torch.nn.Linear(d, hidden, bias=False)
        self.up_proj = torch.nn.Linear(d, hidden, bias=False)
        self.down_proj = torch.nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (
            p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLlama(torch.nn.Module):
    def __init__(self, vocab=256, d=128, layers=2, heads=4, hidden=256):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def edge_program(layers, dim, group_size):
    from executorch.exir import to_edge
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    model = TinyLlama(d=dim, layers=layers, hidden=2 * dim).eval()
    quantize_(
        model,
        Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(group_size)
        ),
    )
    tokens = torch.randint(0, 256, (1, 16))
    return to_edge(torch.export.export(model, (tokens,))).exported_program()


def count_choose_qparams(ep) -> int:
    return sum("choose_qparams" in str(n.target) for n in ep.graph.nodes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import executorch.backends.vulkan.patterns as vk_patterns

    from qlower.fuse import run_fusion

    base = edge_program(args.layers, args.dim, args.group_size)
    ours_t, stock_t = [], []
    for _ in range(args.repeat):
        ep = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = run_fusion(ep)
        ours_t.append(time.perf_counter() - t0)
        ours_cq = count_choose_qparams(ep)

        ep = copy.deepcopy(base)
        t0 = time.perf_counter()
        replaced = vk_patterns.replace_all_fusable_subgraphs(ep, ep.graph_module)
        ep.graph_module.recompile()
        stock_t.append(time.perf_counter() - t0)
        stock_cq = count_choose_qparams(ep)

    ours_s, stock_s = statistics.median(ours_t), statistics.median(stock_t)
    print(f"model: TinyLlama layers={args.layers} dim={args.dim} group={args.group_size}")
    print(f"linears fused: qlower {len(report.fused)}/{len(report.layers)}, stock pattern pass {replaced} replacements")
    print(f"fusion time (median of {args.repeat}): qlower {ours_s * 1e3:.1f} ms, stock {stock_s * 1e3:.1f} ms, "
          f"ratio qlower/stock {ours_s / stock_s:.2f}")
    print(f"choose_qparams_affine nodes left: qlower {ours_cq}, stock {stock_cq}")


if __name__ == "__main__":
    main()
