"""What differs between architectures, written as data.

One `ArchSpec` per family says where the decoder blocks live and which linears inside a block read
the same input, and from which module that input comes (`LinearGroup`). Block-wise calibrators and
equivalent transforms (smoothing, scaling) work from these names only; no per-model code.
Module names were checked against transformers 5.23 (`models/<family>/modeling_<family>.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from abqllm.errors import AbqError


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input tensor.

    `prev` produces that input: a norm (a per-channel scale can be folded into its weight), a linear
    (folded into its output rows, e.g. v_proj -> o_proj), or None (nothing to fold into, e.g. down_proj
    reads act(gate) * up, or OPT-350m's post-LN norms that also feed the residual).
    """

    prev: str | None
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    """Names are relative to a decoder block unless they are dotted paths from the top model."""

    name: str
    architectures: tuple[str, ...]  # HF class names (config.architectures[0])
    model_types: tuple[str, ...]  # config.model_type, for configs without `architectures`
    blocks: str  # ModuleList of decoder blocks, from the top model
    embed: str
    final_norm: str
    lm_head: str
    groups: tuple[LinearGroup, ...]  # in forward order; together they cover every nn.Linear of a block
    attn: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    mlp_up: str
    mlp_gate: str | None  # None: plain MLP (OPT fc1 -> act -> fc2)
    mlp_down: str
    has_bias: bool  # linears carry biases by default (OPT all, Qwen2 q/k/v); still check `.bias`
    norm: str  # "rmsnorm" or "layernorm" (LayerNorm also subtracts the mean and adds a bias)
    # Gemma norms compute norm(x) * (1 + w): folding a scale s into one means w' = (1 + w) * s - 1.
    norm_plus_one: bool = False
    # Per-head RMSNorms applied to q/k after the projections (Qwen3, Gemma3): a per-channel scale on
    # q_proj/k_proj outputs does not pass through them unchanged.
    qk_norms: tuple[str, ...] = ()
    # Norms applied to o_proj / down_proj outputs before the residual add (Gemma2/3 "sandwich" norms):
    # those outputs are not on the residual stream, so a rotation of the residual stream stops there.
    post_norms: tuple[str, ...] = ()
    # False for OPT-350m (do_layer_norm_before=False): norms sit after the residual add.
    pre_norm: bool = True

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.linears)

    @property
    def norms(self) -> tuple[str, ...]:
        """Block norms that feed linears (the `prev` of a group that is not a linear)."""
        lin = set(self.linear_names)
        return tuple(g.prev for g in self.groups if g.prev is not None and g.prev not in lin)


def _llama_like(name, architectures, model_types, mlp_norm="post_attention_layernorm", **extra) -> ArchSpec:
    """The Llama block layout that Mistral, Qwen and Gemma share up to the extras."""
    fields = dict(
        name=name,
        architectures=architectures,
        model_types=model_types,
        blocks="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        groups=(
            LinearGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            LinearGroup("self_attn.v_proj", ("self_attn.o_proj",)),
            LinearGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj")),
            # down_proj reads act(gate) * up; scaling up_proj's output rows is the usual fold (AWQ).
            LinearGroup("mlp.up_proj", ("mlp.down_proj",)),
        ),
        attn="self_attn",
        q_proj="self_attn.q_proj",
        k_proj="self_attn.k_proj",
        v_proj="self_attn.v_proj",
        o_proj="self_attn.o_proj",
        mlp_up="mlp.up_proj",
        mlp_gate="mlp.gate_proj",
        mlp_down="mlp.down_proj",
        has_bias=False,
        norm="rmsnorm",
    )
    return ArchSpec(**{**fields, **extra})


_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
_GEMMA = dict(
    mlp_norm="pre_feedforward_layernorm",  # Gemma's post_attention_layernorm normalizes o_proj's output
    norm_plus_one=True,
    post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
)

SPECS: tuple[ArchSpec, ...] = (
    _llama_like("llama", ("LlamaForCausalLM",), ("llama",)),  # also SmolLM2
    _llama_like("mistral", ("MistralForCausalLM",), ("mistral",)),
    _llama_like("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), has_bias=True),
    _llama_like("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), qk_norms=_QK_NORMS),
    _llama_like("gemma2", ("Gemma2ForCausalLM",), ("gemma2",), **_GEMMA),
    _llama_like("gemma3", ("Gemma3ForCausalLM",), ("gemma3_text",), qk_norms=_QK_NORMS, **_GEMMA),
    ArchSpec(
        name="opt",
        architectures=("OPTForCausalLM",),
        model_types=("opt",),
        blocks="model.decoder.layers",
        embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        lm_head="lm_head",
        groups=(
            LinearGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            LinearGroup("self_attn.v_proj", ("self_attn.out_proj",)),
            LinearGroup("final_layer_norm", ("fc1",)),
            LinearGroup("fc1", ("fc2",)),  # ReLU is positively homogeneous, so fc1 -> fc2 scaling is exact
        ),
        attn="self_attn",
        q_proj="self_attn.q_proj",
        k_proj="self_attn.k_proj",
        v_proj="self_attn.v_proj",
        o_proj="self_attn.out_proj",
        mlp_up="fc1",
        mlp_gate=None,
        mlp_down="fc2",
        has_bias=True,
        norm="layernorm",
    ),
)


def supported_architectures() -> list[str]:
    return [a for spec in SPECS for a in spec.architectures]


def arch_for(config) -> ArchSpec:
    """The spec for a transformers config: by `architectures[0]`, else by `model_type`."""
    archs = getattr(config, "architectures", None) or []
    model_type = getattr(config, "model_type", None)
    key = archs[0] if archs else model_type
    spec = next((s for s in SPECS if key in (s.architectures if archs else s.model_types)), None)
    if spec is None:
        raise AbqError(
            f"architecture {key} is not supported; supported: {', '.join(supported_architectures())}; "
            "add an ArchSpec in abqllm/models/arch.py"
        )
    if spec.name == "opt" and getattr(config, "do_layer_norm_before", True) is False:
        # OPT-350m is post-LN: each norm's output is also the residual, so nothing folds into it.
        norms = set(spec.norms)
        groups = tuple(LinearGroup(None if g.prev in norms else g.prev, g.linears) for g in spec.groups)
        spec = replace(spec, groups=groups, pre_norm=False)
    return spec


def attention_dims(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim); OPT has no GQA and no head_dim attribute."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def get_submodule(model: nn.Module, dotted: str) -> nn.Module:
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        raise AbqError(
            f"{type(model).__name__} has no module '{dotted}'; its ArchSpec in abqllm/models/arch.py "
            "does not match this model"
        ) from None


def decoder_blocks(model: nn.Module, arch: ArchSpec) -> nn.ModuleList:
    blocks = get_submodule(model, arch.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise AbqError(
            f"'{arch.blocks}' in {type(model).__name__} is not a ModuleList; "
            "fix its ArchSpec in abqllm/models/arch.py"
        )
    return blocks


def block_linears(block: nn.Module, arch: ArchSpec) -> dict[str, nn.Module]:
    """Relative name -> linear, in forward order.

    Returns whatever module sits at each name (a quantized replacement too), but first checks that
    every nn.Linear in the block is named by a group: a linear the spec misses would silently stay
    in float.
    """
    found = {name for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(found - set(arch.linear_names))
    if missing:
        raise AbqError(
            f"{type(block).__name__} has linears the '{arch.name}' ArchSpec does not cover: "
            f"{', '.join(missing)}; add them to a LinearGroup in abqllm/models/arch.py"
        )
    return {name: get_submodule(block, name) for name in arch.linear_names}
