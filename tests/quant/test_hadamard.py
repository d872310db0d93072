import pytest
import torch
from torch import nn

import abqllm
from abqllm.nn.qlinear import QuantLinear
from abqllm.quant import hadamard as H
from abqllm.spec import LayerSpec, parse_layer_scheme
from tests.tiny import make_tiny_llama


def test_matrix_is_orthogonal_and_symmetric():
    h = H.hadamard_matrix(64, torch.float64)
    assert torch.allclose(h @ h, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)
    with pytest.raises(abqllm.AbqError, match="power of two"):
        H.hadamard_matrix(12)


@pytest.mark.parametrize("k, cap, b", [(1536, 512, 512), (11008, 512, 256), (160, 512, 32), (4096, 64, 64)])
def test_block_size(k, cap, b):
    assert H.block_size_for(k, cap) == b


def test_block_size_refuses_odd_widths():
    with pytest.raises(abqllm.AbqError, match="drop --hadamard"):
        H.block_size_for(6 * 7, 512)


def test_rotation_is_block_diagonal():
    x = torch.randn(3, 96, dtype=torch.float64)
    h = H.hadamard_matrix(32, torch.float64)
    full = torch.block_diag(h, h, h)
    assert torch.allclose(H.rotate_last_dim(x, 32), x @ full, atol=1e-12)


def _outlier_input(n=64, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, 7] *= 60.0  # SwiGLU-like outlier channels
    x[:, 100] *= 40.0
    return x


def test_rotated_layer_is_exact_in_float_and_better_at_a4():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(256, 48, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 256, generator=g) * 0.05)
    x = _outlier_input()
    ref = lin(x)
    plain = QuantLinear.from_float(lin, parse_layer_scheme("W8A4"))
    rot = nn.Linear(256, 48, bias=True)
    rot.load_state_dict(lin.state_dict())
    b = H.install(rot, 512)
    assert b == 256 and H.rotated_block(rot) == 256
    assert torch.allclose(rot(x), ref, atol=1e-4)  # the float function is unchanged
    spec = parse_layer_scheme("W8A4")
    q = QuantLinear.from_float(rot, LayerSpec(spec.weight, spec.act, hadamard=b))
    err_plain = (plain(x) - ref).pow(2).mean()
    err_rot = (q(x) - ref).pow(2).mean()
    assert err_rot < 0.25 * err_plain, (err_rot, err_plain)


def test_install_refuses_a_second_rotation():
    lin = nn.Linear(64, 8)
    H.install(lin, 64)
    with pytest.raises(abqllm.AbqError, match="already"):
        H.install(lin, 64)


def _quantized_error(method, scheme, tmp_path=None):
    model, tok = make_tiny_llama()
    ids = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float_logits = model(ids[:1]).logits
    opts = {"epochs": 1} if method.startswith("abq") else {}
    abqllm.quantize(model, scheme, method=method, calib_ids=ids, progress=False, **opts)
    with torch.no_grad():
        out = model(ids[:1]).logits
    return model, tok, ids, out, (out - float_logits).pow(2).mean().sqrt()


@pytest.mark.parametrize("method", ["rtn", "gptq", "smoothquant", "abq", "abq+gptq"])
def test_methods_calibrate_rotated_down_projections_and_checkpoints_keep_them(method, tmp_path):
    model, tok, ids, out, err = _quantized_error(method, "W8A8+had:512")
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.spec.hadamard == 32  # 160 columns: blocks of 32
    assert model.model.layers[0].mlp.up_proj.spec.hadamard == 0
    # A method that calibrated the unrotated weight, or saw unrotated inputs, would be far off; a
    # random tiny model has no outliers, so the rotation should neither help nor hurt much.
    err_plain = _quantized_error(method, "W8A8")[-1]
    assert err < 1.5 * err_plain, (err, err_plain)
    loaded, _ = abqllm.load_model(str(abqllm.save_quantized(model, tok, tmp_path / "c")))
    assert loaded.model.layers[1].mlp.down_proj.spec.hadamard == 32
    with torch.no_grad():
        assert torch.equal(loaded(ids[:1]).logits, out)


def test_rotation_does_not_touch_skipped_down_projections():
    model, tok = make_tiny_llama()
    w = model.model.layers[0].mlp.down_proj.weight.clone()
    abqllm.quantize(model, abqllm.QuantSpec(parse_layer_scheme("W4A16").weight, skip=("lm_head", "down_proj"),
                                            hadamard=64), method="rtn", progress=False)
    down = model.model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear and torch.equal(down.weight, w) and not down._forward_pre_hooks


def test_export_refuses_rotated_layers(tmp_path):
    from abqllm.export.compressed_tensors import export_compressed_tensors
    model, tok = make_tiny_llama()
    abqllm.quantize(model, "W4A16+had:512", method="rtn", progress=False)
    ckpt = abqllm.save_quantized(model, tok, tmp_path / "c")
    with pytest.raises(abqllm.AbqError, match="--hadamard"):
        export_compressed_tensors(ckpt, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_cpu_fast_transform_agrees_with_the_dense_product_and_autograd_still_works():
    from abqllm.kernels import cpu as cpu_kernels
    if not cpu_kernels.available():
        pytest.skip("CPU kernels not built")
    x = torch.randn(3, 5, 1536)
    dense = (x.double().reshape(3, 5, 3, 512) @ H.hadamard_matrix(512, torch.float64)).reshape(3, 5, 1536)
    fast = H.rotate_last_dim(x, 512)
    assert fast.dtype == torch.float32 and fast.shape == x.shape
    assert torch.allclose(fast.double(), dense, atol=1e-5, rtol=1e-5)
    xg = x.clone().requires_grad_()
    H.rotate_last_dim(xg, 512).sum().backward()  # calibration trains through the rotation: the dense path
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("method", ["rtn", "gptq", "abq+gptq"])
def test_rotation_of_every_linear(method, tmp_path):
    model, tok, ids, out, err = _quantized_error(method, "W8A8+had:512:all")
    blk = model.model.layers[0]
    assert blk.mlp.down_proj.spec.hadamard == 32
    assert all(getattr(blk, p).get_submodule(n).spec.hadamard == 64  # 64 input columns: one block of 64
               for p, n in [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                            ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj")])
    err_plain = _quantized_error(method, "W8A8")[-1]
    assert err < 2 * err_plain, (err, err_plain)  # a wrong basis would be off by orders of magnitude
    loaded, _ = abqllm.load_model(str(abqllm.save_quantized(model, tok, tmp_path / "c")))
    with torch.no_grad():
        assert torch.equal(loaded(ids[:1]).logits, out)
