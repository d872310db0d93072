"""A Llama-shaped decoder with random weights for the end-to-end decode benchmark (no download needed).

gpt-fast style: static KV cache [B, H, max_seq, D], attention over the whole cache with a causal mask so
every decode step has the same shapes and the step can be captured in one CUDA graph. On CUDA the layers run
through fused_ops (5 small kernels a layer besides linears and attention, instead of about 43), so that what the
benchmark times is mostly the linears, for every variant alike; `fused=False` keeps the plain torch ops. Linear layers are
either fp16 nn.Linear or abqllm QuantLinear filled with random packed codes, scales and zero points
(the speed of the kernels does not depend on the values; the layer still checks its shapes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from abqllm.formats.packing import padded_k
from abqllm.nn import QuantLinear
from abqllm.spec import ActSpec, LayerSpec


@dataclass(frozen=True)
class Shape:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    ffn: int = 11008
    vocab: int = 32000
    max_seq: int = 384

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


LLAMA2_7B = Shape()


def random_quant_linear(k: int, n: int, spec: LayerSpec, device, kernel: str = "auto", seed: int = 0) -> QuantLinear:
    """A QuantLinear with random packed codes (any bit pattern is a valid code), scales ~ 1e-2 and random zeros."""
    with torch.device("meta"):  # every buffer is replaced below: allocate nothing for the placeholders
        layer = QuantLinear(k, n, spec, dtype=torch.float16, kernel=kernel)
    g = torch.Generator(device=device).manual_seed(seed)
    words = padded_k(k) // 32 * spec.weight.storage_bits
    layer.qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (n, words), dtype=torch.int32, device=device, generator=g)
    groups = layer.scales.shape[1]
    layer.scales = (torch.rand(n, groups, device=device, generator=g) * 1e-2 + 5e-3).half()
    layer.zeros = torch.randint(0, spec.weight.qmax + 1, (n, groups), device=device, generator=g).to(torch.uint8)
    if hasattr(layer, "act_scale"):  # a static activation range: QuantLinear's defaults
        layer.act_scale = torch.ones(1, device=device)
        layer.act_zero = torch.zeros(1, device=device)
    return layer


def with_act(layer: QuantLinear, act: ActSpec) -> QuantLinear:
    """The same packed weights under another activation scheme, shared, not copied: the GPU suite times A16, A8
    and A4 on one set of weights, and their kernel layouts (k-packed, bit planes) are built once."""
    with torch.device("meta"):  # placeholders only: the buffers are the layer's own
        twin = QuantLinear(layer.in_features, layer.out_features, replace(layer.spec, act=act), dtype=torch.float16,
                           kernel=layer.kernel)
    twin.qweight, twin.scales, twin.zeros, twin.bias = layer.qweight, layer.scales, layer.zeros, layer.bias
    if hasattr(twin, "act_scale"):
        twin.act_scale = torch.ones(1, device=layer.qweight.device)
        twin.act_zero = torch.zeros(1, device=layer.qweight.device)
    twin._kernel_cache = layer._kernel_cache  # keyed by the weight tensors' identity and version: valid for both
    return twin


def make_linear(k: int, n: int, spec: LayerSpec | None, device, seed: int) -> nn.Module:
    if spec is None:
        lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.float16)
        with torch.no_grad():
            g = torch.Generator(device=device).manual_seed(seed)
            lin.weight.copy_(torch.randn(n, k, device=device, generator=g, dtype=torch.float16) * (1 / math.sqrt(k)))
        return lin
    return random_quant_linear(k, n, spec, device, kernel="triton", seed=seed)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=torch.float16))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, s: Shape, spec, batch: int, device, seed: int):
        super().__init__()
        self.s = s
        d = s.dim
        # q, k, v as one [3 dim, dim] linear and gate, up as one [2 ffn, dim] (as vLLM and gpt-fast hold them; rows
        # are independent, per-group scales included, so this is the same arithmetic with fewer, wider launches)
        self.qkv = make_linear(d, 3 * d, spec, device, seed)
        self.o = make_linear(d, d, spec, device, seed + 1)
        self.gate_up = make_linear(d, 2 * s.ffn, spec, device, seed + 2)
        self.down = make_linear(s.ffn, d, spec, device, seed + 3)
        self.norm1, self.norm2 = RMSNorm(d, device), RMSNorm(d, device)
        shape = (batch, s.n_heads, s.max_seq, s.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16, device=device), persistent=False)

    def forward_fused(self, x, delta, pos, mask):
        """The same layer through fused_ops (5 small kernels besides the linears and attention). Takes the residual
        x and the previous layer's MLP output `delta` (added here, in the first norm); returns (x, mlp output)."""
        from benchmarks.gpu import fused_ops as FO
        b, t, _ = x.shape
        x, h = FO.add_rmsnorm(x, delta, self.norm1.weight, 1e-5)
        q = FO.rope_cache(self.qkv(h), self.rope_cos, self.rope_sin, pos, self.k_cache, self.v_cache)
        a = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        x, h = FO.add_rmsnorm(x, self.o(a.transpose(1, 2).reshape(b, t, -1)), self.norm2.weight, 1e-5)
        return x, self.down(FO.silu_mul(self.gate_up(h)))

    def forward(self, x, pos, cos, sin, mask):
        b, t, _ = x.shape
        h = self.norm1(x)
        q, k, v = (p.view(b, t, self.s.n_heads, self.s.head_dim).transpose(1, 2) for p in self.qkv(h).chunk(3, -1))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        a = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        h = self.norm2(x)
        gate, up = self.gate_up(h).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)


def rope(x, cos, sin):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2).to(x.dtype)


class Llama(nn.Module):
    """`fused` (default: on CUDA) runs the layers through fused_ops; False keeps the plain torch ops."""

    def __init__(self, s: Shape, spec: LayerSpec | None, batch: int, device, fused: bool | None = None):
        super().__init__()
        self.s = s
        self.fused = torch.device(device).type == "cuda" if fused is None else fused
        self.embed = nn.Embedding(s.vocab, s.dim, device=device, dtype=torch.float16)
        self.blocks = nn.ModuleList(Block(s, spec, batch, device, seed=10 * i) for i in range(s.n_layers))
        self.norm = RMSNorm(s.dim, device)
        self.lm_head = make_linear(s.dim, s.vocab, None, device, seed=12345)  # kept fp16, as QuantSpec skips lm_head
        freqs = 1.0 / (10000 ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim))
        ang = torch.outer(torch.arange(s.max_seq, device=device).float(), freqs)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        self.register_buffer("causal", torch.ones(s.max_seq, s.max_seq, dtype=torch.bool, device=device).tril(),
                             persistent=False)
        for blk in self.blocks:  # the fused rope reads the tables by position (shared, not copied)
            blk.rope_cos, blk.rope_sin = self.cos, self.sin

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens [B, T], pos [T] (positions in the cache) -> logits of the last position [B, vocab] (fp32)."""
        x = self.embed(tokens)
        mask = self.causal[pos][None, None]
        if self.fused:
            from benchmarks.gpu import fused_ops as FO
            delta = None
            for blk in self.blocks:
                x, delta = blk.forward_fused(x, delta, pos, mask)
            _, h = FO.add_rmsnorm(x[:, -1].contiguous(), delta[:, -1].contiguous(), self.norm.weight, 1e-5)
            return self.lm_head(h).float()
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]
        for blk in self.blocks:
            x = blk(x, pos, cos, sin, mask)
        return self.lm_head(self.norm(x[:, -1])).float()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers (packed weights, scales, zeros, norms, embeddings)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                       if not name.endswith(("k_cache", "v_cache", "cos", "sin", "causal")))


def kv_bytes(model: Llama) -> int:
    return sum(b.k_cache.numel() * 2 * 2 for b in model.blocks)


@torch.no_grad()
def generate_timed(model: Llama, batch: int, prompt: int, new_tokens: int, use_graph: bool = True) -> dict:
    """Prefill `prompt` random tokens, then decode `new_tokens` greedily, the step captured in a CUDA graph."""
    dev = model.embed.weight.device
    g = torch.Generator(device=dev).manual_seed(0)
    tokens = torch.randint(0, model.s.vocab, (batch, prompt), device=dev, generator=g)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer = _Timer(cuda)

    model(tokens, torch.arange(prompt, device=dev))  # warm-up prefill (compiles the prefill kernels)
    sync()
    timer.start()
    logits = model(tokens, torch.arange(prompt, device=dev))
    prefill_s = timer.stop()

    static_tok = logits.argmax(-1, keepdim=True)
    static_pos = torch.tensor([prompt], device=dev)

    def step():
        nxt = model(static_tok, static_pos).argmax(-1, keepdim=True)
        static_tok.copy_(nxt)
        static_pos.add_(1)

    if use_graph and cuda:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up outside the graph (compiles the decode kernels)
                step()
        torch.cuda.current_stream().wait_stream(s)
        static_pos.fill_(prompt)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    else:
        step()
        run = step
    static_pos.fill_(prompt)
    sync()
    timer.start()
    for _ in range(new_tokens):
        run()
    decode_s = timer.stop()
    assert int(static_pos.item()) == prompt + new_tokens
    return dict(prefill_s=prefill_s, decode_s=decode_s, tokens_per_s=batch * new_tokens / decode_s,
                ms_per_step=1e3 * decode_s / new_tokens, graph=bool(use_graph and cuda),
                fused_layers=bool(getattr(model, "fused", False)))


class _Timer:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def start(self):
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            import time
            self.t = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            return self.a.elapsed_time(self.b) / 1e3
        import time
        return time.perf_counter() - self.t
