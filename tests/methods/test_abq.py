"""ABQ: transforms are exact before quantization, calibration lowers the block loss, results re-apply,
and an interrupted calibration resumes to the same checkpoint."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import abqllm
from abqllm.calib.runner import BlockContext, capture_block_inputs
from abqllm.methods import abq_math as M
from abqllm.methods.abq import ABQ, _groups
from abqllm.models.arch import arch_for, attention_dims, block_linears, decoder_blocks
from abqllm.spec import parse_scheme
from tests.tiny import TEXT, make_tiny_llama


def _tiny_gemma():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return Gemma2ForCausalLM(cfg).eval()


def _ctx(model, scheme="W4A8", n=4, length=32, index=0, method=None):
    arch = arch_for(model.config)
    ids = torch.randint(0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(0))
    x, kwargs = capture_block_inputs(model, arch, ids)
    block = decoder_blocks(model, arch)[index]
    spec = parse_scheme(scheme)
    return BlockContext(index, len(decoder_blocks(model, arch)), f"{arch.blocks}.{index}", block,
                        dict(block_linears(block, arch)), arch, spec, torch.device("cpu"), x, x.clone(), kwargs[index])


@pytest.mark.parametrize("make", [lambda: make_tiny_llama()[0], _tiny_gemma])
def test_transforms_leave_the_float_block_unchanged(make):
    model = make()
    ctx = _ctx(model)
    weights = {n: p.detach() for n, p in ctx.block.named_parameters()}
    groups = _groups(ctx)
    params = {M.group_key(i): torch.randn(weights[f"{g.prev}.weight"].shape[0]) * 0.5 for i, g in groups}
    down = ctx.arch.mlp_down
    params[f"comp.{down}.a"] = torch.zeros(weights[f"{down}.weight"].shape[0], 1)
    params[f"comp.{down}.b"] = torch.ones(1, weights[f"{down}.weight"].shape[1])
    new = M.transform_block(weights, params, [(M.group_key(i), g) for i, g in groups], ctx.arch,
                            attention_dims(model.config))
    assert any(k.endswith("layernorm.weight") for k in new) and f"{ctx.arch.o_proj}.weight" in new
    ref = ctx.run(ctx.block, ctx.x_fp)
    out = torch.func.functional_call(ctx.block, new, (ctx.x_fp,), ctx.kwargs)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def _block_error(ctx, method):
    result = method.calibrate(ctx)
    target = ctx.run(ctx.block, ctx.x_fp)
    import copy
    block = copy.deepcopy(ctx.block)
    c2 = BlockContext(**{**vars(ctx), "block": block, "linears": dict(block_linears(block, ctx.arch))})
    for name, q in method.apply(c2, result).items():
        block.set_submodule(name, q)
    return (c2.run(block, ctx.x_q) - target).pow(2).mean().item()


@pytest.mark.parametrize("scheme", ["W3A16", "W4A4"])
def test_calibration_beats_its_own_starting_point(scheme):
    model, _ = make_tiny_llama(layers=2)
    ctx = _ctx(model, scheme, n=8, length=32)
    ctx.x_fp[..., :3] *= 20  # outlier channels, as real models have
    ctx.x_q = ctx.x_fp.clone()
    torch.manual_seed(0)
    start = _block_error(ctx, ABQ(epochs=0))
    torch.manual_seed(0)
    trained = _block_error(ctx, ABQ(epochs=10, use_attn=False, use_cos=False, lr_smooth=5e-3, lr_clip=5e-3))
    assert trained < start * 0.98


def test_artifacts_reapply_to_the_same_model(tmp_path):
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    a, tok = make_tiny_llama()
    abqllm.quantize(a, "W4A8", method="abq", calib_ids=ids, artifacts=tmp_path / "art", progress=False, epochs=2)
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["block_000.safetensors", "block_001.safetensors",
                                                                    "manifest.json"]
    b, _ = make_tiny_llama()
    abqllm.quantize(b, "W4A8", method="abq", calib_ids=ids, artifacts=tmp_path / "art", progress=False, epochs=2)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c, _ = make_tiny_llama()
    with pytest.raises(abqllm.AbqError, match="other settings"):
        abqllm.quantize(c, "W4A8", method="abq", calib_ids=ids, artifacts=tmp_path / "art", progress=False, epochs=3)


def test_killed_calibration_resumes_to_the_same_checkpoint(tmp_path):
    make_tiny_llama(tmp_path / "model", layers=3)
    (tmp_path / "text.txt").write_text(TEXT)

    def cmd(out):
        return [sys.executable, "-m", "abqllm.cli", "quantize", "--model", str(tmp_path / "model"), "--wbits", "3",
                "--abits", "8", "--method", "abq", "--method-opt", "epochs=12", "--data", str(tmp_path / "text.txt"),
                "--calib-samples", "8", "--calib-seqlen", "64", "--out", str(out)]

    env = {**os.environ, "TQDM_DISABLE": "1"}
    subprocess.run(cmd(tmp_path / "straight"), check=True, capture_output=True, env=env)
    proc = subprocess.Popen(cmd(tmp_path / "resumed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    art = tmp_path / "resumed.calib"
    deadline = time.time() + 120
    while not (art / "block_000.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-way through block 1
    proc.wait()
    done = sorted(p.name for p in art.glob("block_*.safetensors"))
    assert 1 <= len(done) < 3, done  # killed between the first and the last block
    assert not (tmp_path / "resumed").exists()  # nothing that looks like a checkpoint
    subprocess.run(cmd(tmp_path / "resumed"), check=True, capture_output=True, env=env)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sink_token_weights_cap_outlier_tokens_only():
    t = torch.randn(2, 6, 16)
    t[:, 0] *= 300  # a sink token in every window
    w = M.token_weights(t)
    assert w.shape == (2, 6) and (w[:, 0] < 1e-3).all()
    assert (w[:, 1:] > 0.2).all() and (w <= 1).all() and (w == 1).sum() >= 6  # typical tokens keep 1
    y = t * (1 + 0.1 * torch.randn_like(t))  # relative error: the sink's is 300^2 times a typical token's
    plain = M.abq_loss(y, t, t, None, None, use_cos=False)[0]
    sink = M.abq_loss(y, t, t, None, None, use_cos=False, token_weight="sink")[0]
    assert sink < plain / 10  # the sink's error no longer owns the loss
    with pytest.raises(abqllm.errors.AbqError, match="token_weight"):
        ABQ(token_weight="max")


def test_sink_weighting_calibrates():
    model, _ = make_tiny_llama(layers=2)
    ctx = _ctx(model, "W4A8", n=4, length=16)
    ctx.x_fp[:, 0] *= 50
    ctx.x_q = ctx.x_fp.clone()
    torch.manual_seed(0)
    assert _block_error(ctx, ABQ(epochs=2, token_weight="sink")) < float("inf")
