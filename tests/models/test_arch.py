import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen3Config,
)

from abqllm.errors import AbqError
from abqllm.models.arch import (
    SPECS,
    arch_for,
    attention_dims,
    block_linears,
    decoder_blocks,
    get_submodule,
)

TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=128, head_dim=16,
)
OPT_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                vocab_size=128, word_embed_proj_dim=64)

CONFIGS = {
    "LlamaForCausalLM": (LlamaConfig, TINY),
    "MistralForCausalLM": (MistralConfig, TINY),
    "Qwen2ForCausalLM": (Qwen2Config, TINY),
    "Qwen3ForCausalLM": (Qwen3Config, TINY),
    "Gemma2ForCausalLM": (Gemma2Config, TINY),
    "Gemma3ForCausalLM": (Gemma3TextConfig, TINY),
    "OPTForCausalLM": (OPTConfig, OPT_TINY),
}


def tiny_model(architecture, **overrides):
    cls, kw = CONFIGS[architecture]
    config = cls(**{**kw, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_every_spec_has_a_tiny_model_here():
    assert {a for s in SPECS for a in s.architectures} == set(CONFIGS)


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_spec_matches_model(architecture):
    model = tiny_model(architecture)
    assert type(model).__name__ == architecture
    # A config fresh from its class has no `architectures`: the model_type fallback must find it too.
    assert arch_for(model.config) is arch_for(type(model.config)(architectures=[architecture]))
    arch = arch_for(model.config)
    assert architecture in arch.architectures

    assert isinstance(get_submodule(model, arch.embed), nn.Embedding)
    assert get_submodule(model, arch.final_norm) is not None
    assert isinstance(get_submodule(model, arch.lm_head), nn.Linear)
    blocks = decoder_blocks(model, arch)
    assert len(blocks) == 2

    for block in blocks:
        linears = block_linears(block, arch)
        all_linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        assert set(linears) == all_linears
        assert list(linears) == list(arch.linear_names)
        for group in arch.groups:
            if group.prev is not None:
                get_submodule(block, group.prev)
            # linears in a group read the same input, so they share in_features
            assert len({linears[n].in_features for n in group.linears}) == 1
        for name in (arch.q_proj, arch.k_proj, arch.v_proj, arch.o_proj, arch.mlp_up, arch.mlp_down):
            assert name in linears
        if arch.mlp_gate:
            assert arch.mlp_gate in linears
        for name in arch.qk_norms + arch.post_norms + arch.norms:
            get_submodule(block, name)
        get_submodule(block, arch.attn)
        assert any(linears[n].bias is not None for n in linears) == arch.has_bias


def test_gemma_norm_is_one_plus_weight():
    """The flag the calibrator relies on: Gemma's norm scales by (1 + w), Llama's by w."""
    x = torch.randn(3, 64)
    for architecture in ["Gemma2ForCausalLM", "Gemma3ForCausalLM", "LlamaForCausalLM"]:
        model = tiny_model(architecture)
        arch = arch_for(model.config)
        norm = get_submodule(decoder_blocks(model, arch)[0], "input_layernorm")
        outs = []
        with torch.no_grad():
            for w in (0.5, 1.0):
                norm.weight.fill_(w)
                outs.append(norm(x))
        ratio = 1.5 / 2.0 if arch.norm_plus_one else 0.5 / 1.0
        torch.testing.assert_close(outs[0], outs[1] * ratio)
        assert arch.norm_plus_one == architecture.startswith("Gemma")


def test_opt_350m_post_ln_has_no_norm_folds():
    arch = arch_for(OPTConfig(**OPT_TINY, do_layer_norm_before=False))
    assert not arch.pre_norm
    assert [g.prev for g in arch.groups] == [None, "self_attn.v_proj", None, "fc1"]
    assert arch_for(OPTConfig(**OPT_TINY)).pre_norm


def test_attention_dims():
    assert attention_dims(LlamaConfig(**TINY)) == (4, 2, 16)
    assert attention_dims(OPTConfig(**OPT_TINY)) == (4, 4, 16)


def test_uncovered_linear_is_named():
    model = tiny_model("LlamaForCausalLM")
    arch = arch_for(model.config)
    block = decoder_blocks(model, arch)[0]
    block.mlp.extra_proj = nn.Linear(4, 4)
    with pytest.raises(AbqError, match="mlp.extra_proj"):
        block_linears(block, arch)


def test_wrong_path_is_an_abq_error():
    model = tiny_model("LlamaForCausalLM")
    with pytest.raises(AbqError, match="no module 'model.decoder.layers'"):
        get_submodule(model, "model.decoder.layers")


@pytest.mark.parametrize("config", [GPT2Config(), GPT2Config(architectures=["GPT2LMHeadModel"])])
def test_unknown_architecture(config):
    with pytest.raises(AbqError, match=r"architecture \w+ is not supported; supported: .*LlamaForCausalLM.*arch\.py"):
        arch_for(config)
