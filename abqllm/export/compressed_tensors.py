"""Export an abqllm checkpoint to the compressed-tensors format (read by vLLM and transformers).

    abq export --model out/w4a16g64 --format compressed-tensors --out out/w4a16g64-ct

Conventions. abqllm stores unsigned codes u with W = s (u - z) and a uint8 zero point z per channel
or group. compressed-tensors stores signed codes q in [-2^(b-1), 2^(b-1) - 1] with W = s (q - zp),
or W = s q for symmetric schemes (no zero point). The conversion is exact:
- asymmetric: q = u - 2^(b-1), zp = z - 2^(b-1), so q - zp = u - z;
- symmetric (z = 2^(b-1) by construction): q = u - z;
- balanced ("W2*": 2^p + 1 levels -2^(p-1)..2^(p-1), stored by abqllm in p + 1 bits): q = u - z as
  a symmetric (p + 1)-bit integer, e.g. W2* becomes 3-bit symmetric with levels -2..2 of -4..3.
Scales are written as float32 copies of abqllm's float16 scales, so the library dequantizes
(q - zp) * s in float32 to exactly the weight abqllm computes (tests/export checks bit equality).

Formats (chosen by the library's own rule, `infer_module_format`): weight-only schemes are
`pack-quantized` (codes packed into int32, 32 codes per b words, code i at bits [i*b, (i+1)*b) of
the run, the dense layout of compressed-tensors >= 0.18; zero points packed the same way along the
output dimension); schemes with integer activations are `int-quantized` (int8 weights, unpacked).
Activations: 8-bit integers, per token at run time (`dynamic`), or one static per-tensor scale
(and zero point) taken over from the checkpoint. The runtime recomputes dynamic activation scales
with its own rounding conventions (e.g. symmetric: absmax/127 in vLLM and abqllm, absmax/127.5 in
compressed-tensors' own fake quantization); weights and static scales are carried over exactly.

Refused, one line each (`AbqError`): activation bits other than 8 or 16 (compressed-tensors
runtimes run 8-bit integer activations; vLLM's int4-activation path is new and unchecked here),
groups that do not divide a layer's input size (the format has no short last group), and a
layer whose codes do not fit the signed range (a damaged checkpoint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from abqllm.errors import AbqError
from abqllm.formats.packing import pack_bits
from abqllm.io.checkpoint import _unique_state_dict, atomic_dir, check_output_dir, load_quantized
from abqllm.models.arch import arch_for
from abqllm.models.hub import is_quantized_checkpoint
from abqllm.nn.qlinear import QuantLinear
from abqllm.quant import primitives as P

MIN_LIBRARY = "0.18"  # dense packing of 3/5/6/7-bit codes (0.17 padded them; <= 0.16 packed only 4/8 bits)
WEIGHTS = "model.safetensors"
ACT_BITS = 8
# vLLM's long-standing compressed-tensors kernels (Marlin weight-only: int4 with or without zero
# points, int8 symmetric; CUTLASS W8A8); other schemes need a vLLM with its newer arbitrary-bit
# kernels. Read from vLLM's code and issues, never run here (no GPU).
_VLLM_WNA16_GROUPS = (None, 32, 64, 128)


@dataclass
class ExportReport:
    out: str
    formats: list[str]
    schemes: dict[str, list[str]]  # readable scheme -> layer names
    ignored: list[str]  # linears left in float (the checkpoint's skip list)
    notes: list[str] = field(default_factory=list)


def _library():
    try:
        import compressed_tensors
    except ImportError:
        raise AbqError("exporting to compressed-tensors needs the compressed-tensors package: "
                       "pip install 'abqllm[export]' (or pip install compressed-tensors)") from None
    from packaging.version import Version

    if Version(compressed_tensors.__version__) < Version(MIN_LIBRARY):
        raise AbqError(f"compressed-tensors {compressed_tensors.__version__} is too old (its 3/5/6/7-bit packing "
                       f"differs); pip install 'compressed-tensors>={MIN_LIBRARY}'")
    return compressed_tensors


def _pack(c: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] unsigned codes -> int32 [R, ceil(C * bits / 32)]: abqllm's layout, minus the padding words."""
    return pack_bits(c, bits)[:, : -(-c.shape[1] * bits // 32)].contiguous()


@dataclass(frozen=True)
class _Plan:
    """How one QuantLinear is written: its compressed-tensors scheme, as a key, and its tensors."""
    key: tuple  # (bits, group_size or None, symmetric, act) -> one config group per distinct key
    tensors: dict[str, torch.Tensor]


def _plan_layer(name: str, layer: QuantLinear) -> _Plan:
    w, a = layer.spec.weight, layer.spec.act
    if layer.spec.hadamard:
        raise AbqError(f"layer {name} rotates its input online (quantized with --hadamard); a compressed-tensors "
                       "export has no place for that rotation, so vLLM would compute a wrong result: re-quantize "
                       "without --hadamard to export")
    if not a.is_float and a.bits != ACT_BITS:
        raise AbqError(f"{layer.spec.name} has {a.bits}-bit activations; a compressed-tensors export takes 8-bit "
                       "integer activations or none: re-quantize with --abits 8 or --abits 16")
    n, k = layer.out_features, layer.in_features
    groups = P.num_groups(k, w.group_size)
    if groups > 1 and k % w.group_size:
        raise AbqError(f"layer {name} has {k} input columns, not a multiple of group size {w.group_size}; "
                       "compressed-tensors needs whole groups: re-quantize with a group size that divides every "
                       "layer's input size (e.g. 64 or 32) or per channel (--group-size 0)")
    group_size = w.group_size if groups > 1 else None  # one group spanning all columns is per channel
    bits = w.storage_bits  # balanced levels need their extra bit as signed integers too
    half = 1 << (bits - 1)
    u = layer.codes().to(torch.int32)
    z = layer.zeros.to(torch.int32)
    if w.symmetric:
        q = u - P.expand_groups(z, k, w.group_size)
        zp = None
    else:
        q, zp = u - half, z - half
    if q.min() < -half or q.max() >= half or (zp is not None and (zp.min() < -half or zp.max() >= half)):
        raise AbqError(f"layer {name}: codes or zero points fall outside {bits}-bit signed integers; "
                       "the checkpoint is damaged or not as abqllm wrote it, re-quantize")
    act = None if a.is_float else (a.symmetric, a.dynamic)
    t = {"weight_scale": layer.scales.float().contiguous()}
    if act is None:  # pack-quantized: unsigned codes q + 2^(b-1), packed like abqllm's qweight
        t["weight_packed"] = _pack((q + half).to(torch.uint8), bits)
        t["weight_shape"] = torch.tensor([n, k])
        if zp is not None:
            t["weight_zero_point"] = _pack((zp + half).to(torch.uint8).T, bits).T.contiguous()
    else:  # int-quantized: int8 codes as they are
        t["weight"] = q.to(torch.int8)
        if zp is not None:
            t["weight_zero_point"] = zp.to(torch.int8)
    if act is not None and not a.dynamic:
        t["input_scale"] = layer.act_scale.float().reshape(1).contiguous()
        if not a.symmetric:
            t["input_zero_point"] = (layer.act_zero.round() - (1 << (ACT_BITS - 1))).to(torch.int8).reshape(1)
    if layer.bias is not None:
        t["bias"] = layer.bias.detach().contiguous()
    return _Plan((bits, group_size, w.symmetric, act), {f"{name}.{k}": v for k, v in t.items()})


def _scheme(key: tuple, targets: list[str]):
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    bits, group_size, symmetric, act = key
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                               strategy="group" if group_size else "channel", group_size=group_size)
    inputs = None
    if act is not None:
        act_symmetric, dynamic = act
        inputs = QuantizationArgs(num_bits=ACT_BITS, type="int", symmetric=act_symmetric, dynamic=dynamic,
                                  strategy="token" if dynamic else "tensor")
    scheme = QuantizationScheme(targets=targets, weights=weights, input_activations=inputs)
    scheme.format = infer_module_format(nn.Linear, scheme).value
    written = "pack-quantized" if act is None else "int-quantized"  # the tensors _plan_layer wrote
    if scheme.format != written:  # a newer library with another rule: a bug to fix here, not a user error
        raise RuntimeError(f"compressed-tensors {scheme.format!r} for {_describe(key)}, but {written} was written")
    return scheme


def _describe(key: tuple) -> str:
    bits, group_size, symmetric, act = key
    a = "A16" if act is None else f"A8 {'static per-tensor' if not act[1] else 'dynamic per-token'}"
    return (f"int{bits} {'symmetric' if symmetric else 'asymmetric'} "
            f"{'group ' + str(group_size) if group_size else 'per channel'}, {a}")


def _vllm_note(key: tuple) -> str | None:
    bits, group_size, symmetric, act = key
    if act is None and (bits == 4 or (bits == 8 and symmetric)) and group_size in _VLLM_WNA16_GROUPS:
        return None
    if act is not None and bits == 8 and symmetric and group_size is None:
        return None
    return (f"{_describe(key)} is outside vLLM's long-standing compressed-tensors kernels (weight-only int4, or "
            "symmetric int8, per channel or groups of 32/64/128; W8A8 with symmetric per-channel int8 weights); it "
            "needs a vLLM with the newer arbitrary-bit (humming) kernels, not checked here")


def export_compressed_tensors(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> ExportReport:
    """Write the abqllm checkpoint folder `checkpoint` as a compressed-tensors model folder `out` (atomically)."""
    folder = Path(checkpoint)
    if not folder.is_dir() or not is_quantized_checkpoint(folder):
        raise AbqError(f"{checkpoint} is not an abqllm checkpoint folder; quantize a model first "
                       "(abq quantize ... --out DIR) and export that folder")
    check_output_dir(out, overwrite)  # before the load
    library = _library()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    model, tokenizer = load_quantized(folder)
    plans = {name: _plan_layer(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    by_key: dict[tuple, list[str]] = {}
    for name, plan in plans.items():
        by_key.setdefault(plan.key, []).append(name)
    ignored = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    # Targets by exact module name, not the class "Linear": tools that match names only (the
    # library's model-free dequantizer) would otherwise take embed_tokens.weight for an int8 weight.
    groups = {f"group_{i}": _scheme(key, names) for i, (key, names) in enumerate(by_key.items())}
    formats = sorted({s.format for s in groups.values()})
    qconfig = QuantizationConfig(config_groups=groups, ignore=ignored,
                                 format=formats[0] if len(formats) == 1 else "mixed-precision",
                                 quantization_status=QuantizationStatus.COMPRESSED)

    tensors = _unique_state_dict(model)
    for name in plans:
        for key in [k for k in tensors if k.startswith(name + ".")]:
            del tensors[key]
    for plan in plans.values():
        tensors.update(plan.tensors)
    config = model.config.to_dict()
    config.pop("quantization_config")
    with atomic_dir(out, overwrite) as tmp:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        # config.json last (atomic_dir): the library adds its quantization_config block to it.
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
    notes = [n for n in (_vllm_note(key) for key in by_key) if n]
    lm_head = arch_for(model.config).lm_head
    if lm_head in plans:
        notes.append(f"{lm_head} is quantized too; llm-compressor keeps it in float and whether vLLM loads a "
                     "quantized one was not checked here: to be safe for vLLM, keep lm_head in --skip")
    return ExportReport(str(out), formats, {_describe(k): names for k, names in by_key.items()}, ignored,
                        notes + [f"written with compressed-tensors {library.__version__}"])
