"""A lean batch-1 decode loop for Llama-like models (float or packed QuantLinear layers).

Why not `model.generate`: for a 135M model on two CPU cores the per-token work in the matmuls is a
few milliseconds, and Hugging Face's generic loop (masks rebuilt per step, cache objects, keyword
plumbing through every module, logits processors) costs about as much again. Here one decode step
calls the layers' own weights directly:

    x = embed[token]
    per block:  h = rmsnorm(x); q, k, v = linears(h); rope(q, k) from a precomputed table;
                write k, v into a preallocated cache at `pos`; attend over cache[:pos+1];
                x += o(attn); h = rmsnorm(x); x += down(act(gate(h)) * up(h))
    logits = lm_head(rmsnorm(x))                       (last position only)

Linears are resolved once: an nn.Linear becomes `F.linear` on its weight, a QuantLinear becomes
the kernel the registry picks for it (the same choice its forward would make), called without the
per-call lookup. The model is not modified.

Decode steps (one token) go through the native C++ step of abqllm/kernels/cpu/abq_cpu_decode.cpp when it can
run the model (fp32, SiLU, Llama RMSNorm, every linear fp32 or on the `cpu` kernel): the same loop in one C++
call, sharing this decoder's KV cache. `exact=True` makes it call torch's own norm, SDPA and SiLU (bit-identical
to the loop above); `exact=False` uses its own (faster, equal to float rounding). See ENGINES below.

Supported: the ArchSpecs whose block is the plain pre-norm Llama layout (llama, mistral, qwen2,
qwen3 with its q/k norms) with RMSNorm and default/linear/llama3/yarn rotary tables and no active
sliding window. Anything else raises AbqError; use the Hugging Face path (`--engine hf`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from abqllm.errors import AbqError
from abqllm.kernels import registry
from abqllm.models.arch import arch_for, attention_dims, decoder_blocks, get_submodule
from abqllm.nn.qlinear import QuantLinear

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
# Rotary variants whose table depends only on the position (not on the current sequence length).
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")

log = logging.getLogger(__name__)

Fn = Callable[[torch.Tensor], torch.Tensor]


def _linear_fn(module: nn.Module, device: torch.device) -> Fn:
    if isinstance(module, QuantLinear):
        kernel = registry.select("linear", module.kernel, module, device)
        if module.spec.hadamard:
            fn = kernel.fn
            return lambda x: fn(module, module.rotated_input(x))
        return partial(kernel.fn, module)
    if type(module) is nn.Linear:
        return partial(F.linear, weight=module.weight, bias=module.bias)
    return module  # anything else that maps [.., K] -> [.., N]


def _native_linear(module: nn.Module, device: torch.device):
    """The module as a linear of the native step (abq_cpu_decode.cpp), or None when it cannot run there: a float
    nn.Linear in fp32, or a QuantLinear whose registry choice on this device is the `cpu` kernel."""
    from abqllm.kernels import cpu as cpu_kernels

    mod = cpu_kernels.module()
    if type(module) is nn.Linear:
        if module.weight.dtype != torch.float32:
            return None
        return mod.float_linear(module.weight.detach().contiguous(),
                                None if module.bias is None else module.bias.detach().float().contiguous())
    if not isinstance(module, QuantLinear) or registry.select("linear", module.kernel, module, device).name != "cpu":
        return None
    w, a = module.spec.weight, module.spec.act
    offsets = None if a.is_float else cpu_kernels.row_offsets(module.qweight, module.scales, module.zeros,
                                                               module.in_features, w.storage_bits, w.group_size)
    return mod.packed_linear(module.qweight, module.scales, module.zeros, module.bias,
                             getattr(module, "act_scale", None), getattr(module, "act_zero", None), offsets,
                             module.in_features, w.storage_bits, w.group_size, a.bits, a.symmetric, cpu_kernels.isa(),
                             module.spec.hadamard)


def fuse_quant_linears(layers: list[nn.Module]) -> QuantLinear | None:
    """One QuantLinear computing the concatenated outputs of `layers`, or None if they cannot be fused.

    Linears that read the same input (q/k/v, gate/up) with the same scheme: packed rows, scales, zero
    points and biases are stacked. With per-token activations every member quantizes the same input
    the same way, so the fused layer's output equals the concatenation (static scales must be equal).
    Costs a copy of the packed weights (a quarter of fp32 at W8, an eighth at W4).
    """
    if not all(isinstance(m, QuantLinear) for m in layers):
        return None
    first = layers[0]
    if any(m.spec != first.spec or m.in_features != first.in_features or m.kernel != first.kernel
           or (m.bias is None) != (first.bias is None) for m in layers):
        return None
    if hasattr(first, "act_scale") and any(not (torch.equal(m.act_scale, first.act_scale)
                                                and torch.equal(m.act_zero, first.act_zero)) for m in layers):
        return None
    out = sum(m.out_features for m in layers)
    bias_dtype = first.bias.dtype if first.bias is not None else torch.float32
    fused = QuantLinear(first.in_features, out, first.spec, bias=first.bias is not None, dtype=bias_dtype,
                        kernel=first.kernel).to(first.qweight.device)
    with torch.no_grad():
        for name in ("qweight", "scales", "zeros") + (("bias",) if first.bias is not None else ()):
            getattr(fused, name).copy_(torch.cat([getattr(m, name) for m in layers]))
        if hasattr(first, "act_scale"):
            fused.act_scale.copy_(first.act_scale)
            fused.act_zero.copy_(first.act_zero)
    return fused


# RMSNorm classes whose forward is exactly F.rms_norm (fp32 statistics, weight * x): one op instead of eight.
_PLAIN_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def _rmsnorm_fn(module: nn.Module) -> Fn:
    if not hasattr(module, "weight") or not hasattr(module, "variance_epsilon"):
        raise AbqError(f"{type(module).__name__} is not an RMSNorm; the fast engine supports RMSNorm models only")
    if type(module).__name__ in _PLAIN_RMSNORMS and module.weight.dtype == torch.float32:
        return partial(F.rms_norm, normalized_shape=module.weight.shape, weight=module.weight,
                       eps=module.variance_epsilon)
    return module


@dataclass
class _Block:
    norm1: Fn
    qkv: list[Fn]  # [q, k, v], or [fused q|k|v]
    o: Fn
    norm2: Fn
    gate_up: list[Fn]  # [gate, up], or [fused gate|up]
    down: Fn
    act: Fn
    q_norm: Fn | None = None
    k_norm: Fn | None = None


@dataclass
class GenerateResult:
    tokens: list[int]  # the new tokens only
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float  # all decode steps (len(tokens) - 1 of them when generation ran to the end)
    decode_steps: int
    stopped_at_eos: bool = False
    step_seconds: list[float] = field(default_factory=list, repr=False)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else float("nan")


# Decode engines on the CPU (`abq generate --engine`, `abq bench cpu --engine`): the CpuDecoder settings of each.
#   fast    the native C++ step with its own norms, attention and SiLU: agrees with the model to float rounding
#   exact   the native C++ step calling torch's own norm, SDPA and SiLU: bit-identical to `python`
#   python  the same step as torch ops from Python: bit-identical to the model's forward with a KV cache
# fast and exact fall back to the Python step (logged) where the native step cannot run a model.
ENGINES = {"fast": {"exact": False}, "exact": {"exact": True}, "python": {"native": False}}


def decoder_for(model: nn.Module, engine: str, max_len: int) -> "CpuDecoder":
    if engine not in ENGINES:
        raise AbqError(f"unknown CPU engine {engine!r}; choose one of {', '.join(ENGINES)}")
    return CpuDecoder(model, max_len=max_len, **ENGINES[engine])


def supports(model: nn.Module, max_len: int | None = None) -> str | None:
    """None if `model` can run on the fast engine with a cache of `max_len` positions, else why not."""
    try:
        arch = arch_for(model.config)
    except AbqError as e:
        return str(e)
    if arch.name not in SUPPORTED_ARCHS or not arch.pre_norm or arch.norm != "rmsnorm" or arch.post_norms:
        return f"the fast engine supports {', '.join(SUPPORTED_ARCHS)} models, not {arch.name}"
    cfg = model.config
    rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in _STATIC_ROPE:
        return f"rope type {rope_type!r} is not supported by the fast engine"
    window = _sliding_window(cfg)
    if window is not None and (max_len is None or max_len > window):
        return f"sequences longer than the sliding window ({window}) are not supported by the fast engine"
    return None


def _sliding_window(cfg) -> int | None:
    window = getattr(cfg, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(cfg, "use_sliding_window", True) is False:
        return None
    return window


class CpuDecoder:
    """Prefill + one-token decode steps over a static KV cache of `max_len` positions (batch 1).

        dec = CpuDecoder(model, max_len=512)
        res = dec.generate(prompt_ids, max_new_tokens=64)          # greedy; res.tokens
    """

    def __init__(self, model: nn.Module, max_len: int | None = None, fuse: bool = True, native: bool | None = None,
                 exact: bool = True):
        cfg = model.config
        max_len = int(max_len or min(getattr(cfg, "max_position_embeddings", 2048), 2048))
        reason = supports(model, max_len)
        if reason:
            raise AbqError(f"{reason}; use the Hugging Face path (--engine hf)")
        arch = arch_for(cfg)
        self.model = model
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.n_heads, self.n_kv, self.head_dim = attention_dims(cfg)
        self.max_len = max_len
        self.embed = get_submodule(model, arch.embed).weight
        self.final_norm = _rmsnorm_fn(get_submodule(model, arch.final_norm))
        self.lm_head = _linear_fn(get_submodule(model, arch.lm_head), self.device)
        self.blocks: list[_Block] = []
        self.scaling = self.head_dim ** -0.5
        self.fused: list[QuantLinear] = []  # kept alive here; the model is left as it was
        self._modules: list[dict] = []  # per block, the modules behind the step
        for block in decoder_blocks(model, arch):
            mod = {name: get_submodule(block, name) for name in arch.linear_names}
            attn = get_submodule(block, arch.attn)
            self.scaling = getattr(attn, "scaling", self.scaling)
            norms = arch.norms  # (attention norm, MLP norm)
            self._modules.append(dict(
                norm1=get_submodule(block, norms[0]), norm2=get_submodule(block, norms[1]),
                qkv=[mod[arch.q_proj], mod[arch.k_proj], mod[arch.v_proj]], o=mod[arch.o_proj],
                gate_up=[mod[arch.mlp_gate], mod[arch.mlp_up]], down=mod[arch.mlp_down],
                act=get_submodule(block, arch.mlp_gate.rsplit(".", 1)[0]).act_fn,
                q_norm=get_submodule(block, arch.qk_norms[0]) if arch.qk_norms else None,
                k_norm=get_submodule(block, arch.qk_norms[1]) if arch.qk_norms else None))
        shape = (len(self._modules), self.n_kv, self.max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        cos, sin = self._rope_table(model)
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * sin_signed: one op fewer per rotation, same values.
        self.cos, self.sin = cos.unsqueeze(1), torch.cat((-sin[:, :half], sin[:, half:]), -1).unsqueeze(1)
        self.pos = 0
        self.native = None  # the C++ step (abq_cpu_decode.cpp) when it can run this model
        self.exact = exact
        self.native_reason = "not requested" if native is False else self._build_native(model, arch)
        if native and self.native is None:
            raise AbqError(f"the native decode step cannot run this model: {self.native_reason}; "
                           "use the exact engine (--engine exact) or --engine hf")
        log.info("decode step: %s", "native (C++)" if self.native is not None else f"Python ({self.native_reason})")
        # The Python step (every step without the native one; the prefill with it). Packed q/k/v and gate/up are
        # fused into one layer each (a copy of their packed weights) only when it runs the decode steps too: the
        # native step calls the layers one by one into one buffer and needs no copy.
        fuse = fuse and self.native is None
        for m in self._modules:
            self.blocks.append(_Block(
                norm1=_rmsnorm_fn(m["norm1"]), norm2=_rmsnorm_fn(m["norm2"]),
                qkv=[_linear_fn(x, self.device) for x in self._group(m["qkv"], fuse)], o=_linear_fn(m["o"], self.device),
                gate_up=[_linear_fn(x, self.device) for x in self._group(m["gate_up"], fuse)],
                down=_linear_fn(m["down"], self.device), act=m["act"], q_norm=m["q_norm"], k_norm=m["k_norm"]))

    def _group(self, mods: list[nn.Module], fuse: bool) -> list[nn.Module]:
        """Linears that read the same input: [one fused QuantLinear] when they fuse, else as they are."""
        fused = fuse_quant_linears(mods) if fuse else None
        if fused is None:
            return mods
        self.fused.append(fused)
        return [fused]

    def _build_native(self, model: nn.Module, arch) -> str | None:
        """Build the native step; None when built, else why it cannot run this model."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return "it runs float32 models on the CPU only"
        if getattr(model.config, "hidden_act", "silu") != "silu":
            return f"activation {model.config.hidden_act!r} (the native step implements SiLU)"
        from abqllm.kernels import cpu as cpu_kernels

        if not cpu_kernels.available():
            return "the CPU kernels are not built (see the warning logged by abqllm.kernels)"
        final = get_submodule(model, arch.final_norm)
        eps = getattr(final, "variance_epsilon", None)
        norms = [final] + [m[k] for m in self._modules for k in ("norm1", "norm2", "q_norm", "k_norm") if m[k] is not None]
        for n in norms:
            if (type(n).__name__ not in _PLAIN_RMSNORMS or n.weight.dtype != torch.float32
                    or n.variance_epsilon != eps):
                return f"norm {type(n).__name__} (the native step implements fp32 Llama RMSNorm with one epsilon)"
        head = _native_linear(get_submodule(model, arch.lm_head), self.device)
        if head is None:
            return "lm_head is neither an fp32 nn.Linear nor a QuantLinear on the cpu kernel"
        mod = cpu_kernels.module()
        dec = mod.NativeDecoder(self.embed.detach().contiguous(), final.weight.detach(), float(eps),
                                self.cos[:, 0].contiguous(), self.sin[:, 0].contiguous(), self.n_heads, self.n_kv,
                                self.head_dim, float(self.scaling), self.exact)
        dec.set_lm_head(head)
        for i, m in enumerate(self._modules):
            lin = {k: [_native_linear(x, self.device) for x in (m[k] if isinstance(m[k], list) else [m[k]])]
                   for k in ("qkv", "o", "gate_up", "down")}
            if any(x is None for group in lin.values() for x in group):
                return f"block {i} has a linear that is neither fp32 nor on the cpu kernel (e.g. a group size " \
                       "that is not a multiple of 32)"
            dec.add_block(m["norm1"].weight.detach(), m["norm2"].weight.detach(), lin["qkv"], lin["o"][0],
                          lin["gate_up"], lin["down"][0],
                          None if m["q_norm"] is None else m["q_norm"].weight.detach(),
                          None if m["k_norm"] is None else m["k_norm"].weight.detach(),
                          self.k_cache[i], self.v_cache[i])
        self.native = dec
        return None

    def _rope_table(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [max_len, head_dim] from the model's own rotary module (its scaling variants included)."""
        rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
        if rotary is None:
            raise AbqError("the model has no rotary embedding module (model.rotary_emb); use --engine hf")
        positions = torch.arange(self.max_len, device=self.device).unsqueeze(0)
        with torch.no_grad():
            cos, sin = rotary(self.embed[:1].unsqueeze(0), positions)
        return cos[0].contiguous(), sin[0].contiguous()

    def reset(self):
        self.pos = 0  # stale cache entries past pos are never read

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Run tokens `ids` [L] at positions pos..pos+L-1; logits [vocab] of the last one."""
        n = ids.shape[0]
        start, end = self.pos, self.pos + n
        if end > self.max_len:
            raise AbqError(f"sequence of {end} tokens exceeds the cache of {self.max_len}; raise max_len")
        if n > 1 and start != 0:
            raise AbqError("a multi-token forward must start at position 0; call reset() first")
        if n == 1 and self.native is not None:
            logits = self.native.step(int(ids[0]), start).clone()  # the step's buffer is reused
            self.pos = end
            return logits
        hq, hkv, d = self.n_heads, self.n_kv, self.head_dim
        half, group = d // 2, hq // hkv
        # narrow() rather than [a:b] indexing throughout: same views, a fraction of the Python cost.
        cos, sin = self.cos.narrow(0, start, n), self.sin.narrow(0, start, n)  # [n, 1, d], broadcast over heads
        x = F.embedding(ids, self.embed)  # [n, hidden]
        nq, nk = hq * d, hkv * d
        for i, b in enumerate(self.blocks):
            h = b.norm1(x)
            if len(b.qkv) == 1:
                y = b.qkv[0](h)
                q, k, v = y.narrow(1, 0, nq), y.narrow(1, nq, nk), y.narrow(1, nq + nk, nk)
            else:
                q, k, v = (f(h) for f in b.qkv)
            if b.q_norm is not None:
                q, k = b.q_norm(q.reshape(n, hq, d)).view(n, nq), b.k_norm(k.reshape(n, hkv, d)).view(n, nk)
            if len(b.qkv) == 1 and b.q_norm is None:  # q and k side by side: rotate both at once
                qk = y.narrow(1, 0, nq + nk).view(n, hq + hkv, d)
                qk = qk * cos + qk.roll(half, -1) * sin
                q, k = qk.narrow(1, 0, hq), qk.narrow(1, hq, hkv)
            else:
                q, k = q.reshape(n, hq, d), k.reshape(n, hkv, d)
                q = q * cos + q.roll(half, -1) * sin
                k = k * cos + k.roll(half, -1) * sin
            v = v.reshape(n, hkv, d)
            kc, vc = self.k_cache[i], self.v_cache[i]  # [hkv, max_len, d]
            kc.narrow(1, start, n).copy_(k.transpose(0, 1))
            vc.narrow(1, start, n).copy_(v.transpose(0, 1))
            # The same SDPA call as the model's own (4-D, GQA inside): results equal to the last bit, which
            # matters for quantized activations, where a 1-ulp change can move a code (see the tests).
            a = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), kc.narrow(1, 0, end).unsqueeze(0),
                                               vc.narrow(1, 0, end).unsqueeze(0), is_causal=n > 1,
                                               scale=self.scaling, enable_gqa=group > 1)
            a = a[0].transpose(0, 1).reshape(n, hq * d)
            x = x + b.o(a)
            h = b.norm2(x)
            if len(b.gate_up) == 1:
                y = b.gate_up[0](h)
                mid = y.shape[-1] // 2
                g, u = y.narrow(1, 0, mid), y.narrow(1, mid, mid)
            else:
                g, u = (f(h) for f in b.gate_up)
            x = x + b.down(b.act(g) * u)
        self.pos = end
        # The norm over every position, then the last row, as the Hugging Face model does: a reduction over [n, H]
        # may round a row differently from one over [1, H].
        return self.lm_head(self.final_norm(x).narrow(0, n - 1, 1))[0]

    def generate(self, prompt_ids, max_new_tokens: int, *, eos_token_id=None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 ignore_eos: bool = False) -> GenerateResult:
        """Prefill `prompt_ids` (1-D ints or [1, L]) then produce up to `max_new_tokens` tokens.

        Greedy unless do_sample. Stops after an EOS token (kept in the output) unless ignore_eos.
        """
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.device).reshape(-1)
        if ids.numel() == 0:
            raise AbqError("empty prompt")
        if max_new_tokens < 1:
            raise AbqError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = set() if ignore_eos or eos_token_id is None else (
            {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
        gen = None
        if do_sample:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(0 if seed is None else seed)
        pick = partial(_sample, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, gen=gen)
        self.reset()
        if ids.numel() + max_new_tokens - 1 > self.max_len:
            raise AbqError(f"prompt ({ids.numel()}) + new tokens ({max_new_tokens}) exceed the cache of "
                           f"{self.max_len} positions")
        t0 = time.perf_counter()
        token = pick(self.forward(ids))
        prefill = time.perf_counter() - t0
        out, steps = [token], []
        stopped = token in eos
        buf = torch.empty(1, dtype=torch.long, device=self.device)
        while len(out) < max_new_tokens and not stopped:
            t = time.perf_counter()
            buf[0] = token
            token = pick(self.forward(buf))
            steps.append(time.perf_counter() - t)
            out.append(token)
            stopped = token in eos
        res = GenerateResult(out, ids.numel(), prefill, sum(steps), len(steps), stopped, steps)
        log.debug("prefill %d tokens: %.1f tok/s; decode %d steps: %.1f tok/s", res.prompt_tokens,
                  res.prefill_tokens_per_s, res.decode_steps, res.decode_tokens_per_s)
        return res


def _sample(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
            gen: torch.Generator | None) -> int:
    if not do_sample or temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
