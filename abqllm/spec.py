"""What to quantize: frozen, validated, serializable descriptions of a WpAq scheme.

Every quantized weight is stored as unsigned integer codes u with a zero point z and a scale s,
W = s * (u - z). The three weight flavours differ only in how s and z are chosen:
- asymmetric (default): 2^p levels spanning [min, max] (zero always inside the range), z per group;
- symmetric: 2^p levels, z = 2^(p-1), s = absmax / (2^(p-1) - 1);
- balanced ("W2*"): 2^p + 1 levels symmetric around zero, {-2^(p-1) .. 2^(p-1)}, z = 2^(p-1),
  s = absmax / 2^(p-1). W2* is {-2,-1,0,1,2}. It needs p + 1 bits of storage.
Activations use the same convention at q bits, computed per token at run time (dynamic) or once
from calibration data per tensor (static). q = 16 means activations stay in floating point.

The output layer (lm_head) is float by default (it is in `skip`). `QuantSpec.lm_head` gives it a
scheme of its own (e.g. W8A8 under a W4A8 body, as llama.cpp keeps its output tensor at Q8_0),
which wins over `skip`; without it, taking lm_head out of `skip` quantizes it with the body's scheme.
Names: "W4A8+head:W8A8" (parse_scheme reads them back).

Rotations (QuantSpec.rotate, QuantSpec.hadamard / hadamard_layers) are part of the scheme too: the
residual rotation is offline ("+rot"); the online Hadamard changes what the quantized layers compute, so
each rotated layer's LayerSpec records its block size ("+had:512", "+had:512:all").
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field

from abqllm.errors import AbqError

FORMAT_VERSION = 1
FLOAT_BITS = 16


def _check_int(value, name: str, lo: int, hi: int, flag: str, extra: tuple[int, ...] = ()) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value), 10)
        except ValueError:
            raise AbqError(f"{name} must be an integer, got {value!r} (use {flag})") from None
    if not (lo <= value <= hi or value in extra):
        allowed = f"{lo}..{hi}" + "".join(f" or {e}" for e in extra)
        raise AbqError(f"{name} must be in {allowed}, got {value} (use {flag})")
    return value


@dataclass(frozen=True)
class WeightSpec:
    bits: int
    balanced: bool = False
    group_size: int = 0  # 0: one group per output channel (per-channel); G > 0: groups of G input columns
    symmetric: bool = False

    def __post_init__(self):
        object.__setattr__(self, "bits", _check_int(self.bits, "weight bits", 1, 8, "--wbits 1..8"))
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 0:
            raise AbqError(f"group size must be a positive integer (or 0 for per-channel), got {gs!r} "
                           "(use --group-size 64, 128, ...)")
        if self.balanced:
            if self.bits > 7:
                raise AbqError("balanced levels need bits + 1 <= 8 of storage; use --wbits 1..7 with --balanced")
            object.__setattr__(self, "symmetric", True)  # balanced levels are symmetric by definition
        elif self.symmetric and self.bits == 1:
            raise AbqError("symmetric 1-bit weights have a single level; use asymmetric or --balanced (ternary)")

    @property
    def storage_bits(self) -> int:
        """Bits per stored code: balanced levels need one more than their name says."""
        return self.bits + 1 if self.balanced else self.bits

    @property
    def qmax(self) -> int:
        """Largest code; codes run 0..qmax."""
        return 2 ** self.bits if self.balanced else 2 ** self.bits - 1

    @property
    def name(self) -> str:
        return f"W{self.bits}{'*' if self.balanced else ''}"


@dataclass(frozen=True)
class ActSpec:
    bits: int = FLOAT_BITS
    symmetric: bool = False
    dynamic: bool = True  # per-token, computed at run time; False: one static scale per tensor from calibration

    def __post_init__(self):
        object.__setattr__(self, "bits", _check_int(self.bits, "activation bits", 2, 8, "--abits 2..8 or 16",
                                                    extra=(FLOAT_BITS,)))

    @property
    def is_float(self) -> bool:
        return self.bits == FLOAT_BITS

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1


@dataclass(frozen=True)
class LayerSpec:
    """The scheme of one linear layer, as stored per layer in a checkpoint."""
    weight: WeightSpec
    act: ActSpec = ActSpec()
    hadamard: int = 0  # block size of the online Hadamard rotation of the input (quant/hadamard.py); 0: none

    def __post_init__(self):
        b = self.hadamard
        if not isinstance(b, int) or b < 0 or b & (b - 1) or b == 1:
            raise AbqError(f"a layer's Hadamard block must be 0 or a power of two >= 2, got {b!r}; re-quantize")

    @property
    def name(self) -> str:
        gs = f"g{self.weight.group_size}" if self.weight.group_size else ""
        had = f"{HAD_NAME}{self.hadamard}" if self.hadamard else ""
        return f"{self.weight.name}A{self.act.bits}{gs}{had}"

    def to_dict(self) -> dict:
        d = {"weight": dataclasses.asdict(self.weight), "act": dataclasses.asdict(self.act)}
        if self.hadamard:  # absent otherwise: dicts of unrotated layers are as before
            d["hadamard"] = self.hadamard
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        try:
            return cls(WeightSpec(**d["weight"]), ActSpec(**d["act"]), d.get("hadamard", 0))
        except (KeyError, TypeError) as e:
            raise AbqError(f"malformed layer spec {d!r} in quantization_config ({e}); re-quantize the model") from None


HEAD_NAME = "+head:"  # spec.name of a body with its own head scheme: "W4A8+head:W8A8"
HAD_NAME = "+had:"  # spec.name with an online Hadamard on the down projection's input: "W4A4+had:512"
HADAMARD_LAYERS = ("down", "all")  # which linears QuantSpec.hadamard rotates the input of
ROT_NAME = "+rot"  # spec.name of a model whose residual stream was rotated before quantization: "W4A4+rot"


def check_head_layer(layer: LayerSpec) -> LayerSpec:
    """The output layer's scheme: any LayerSpec except static activation scales (no calibration for it)."""
    if not layer.act.is_float and not layer.act.dynamic:
        raise AbqError(f"static activation scales are not supported for lm_head ({layer.name}); give it dynamic "
                       "per-token activations (--lm-head W8A8) or keep it float (--lm-head float)")
    return layer


@dataclass(frozen=True)
class QuantSpec:
    """A whole-model scheme: one LayerSpec for every linear inside the decoder blocks, except skipped ones.

    `lm_head`: the output layer's own scheme (round-to-nearest), independent of the body's; when set,
    the output layer is quantized with it even if `skip` names it. None (default): the output layer
    follows `skip` (float by default; the body's scheme if taken out of `skip`).
    """
    weight: WeightSpec
    act: ActSpec = ActSpec()
    skip: tuple[str, ...] = ("lm_head",)  # fnmatch patterns on full module names
    kv_bits: int = FLOAT_BITS
    version: int = field(default=FORMAT_VERSION)
    lm_head: LayerSpec | None = None
    hadamard: int = 0  # largest online Hadamard block on the inputs of `hadamard_layers` (0: none)
    hadamard_layers: str = "down"  # "down": each block's down projection; "all": every linear of the blocks
    rotate: bool = False  # rotate the residual stream (methods/rotation.py) before calibrating: offline, no run-time op

    def __post_init__(self):
        object.__setattr__(self, "skip", tuple(self.skip))
        b = self.hadamard
        if not isinstance(b, int) or isinstance(b, bool) or b < 0 or (b and (b & (b - 1) or b < 8)):
            raise AbqError(f"--hadamard must be 0 (off) or a power of two >= 8 (e.g. 512), got {b!r}")
        if self.hadamard_layers not in HADAMARD_LAYERS:
            raise AbqError(f"--hadamard-layers must be one of {', '.join(HADAMARD_LAYERS)}, got {self.hadamard_layers!r}")
        object.__setattr__(self, "kv_bits", _check_int(self.kv_bits, "kv bits", 2, 8, "--kv-bits 2..8 or 16",
                                                       extra=(FLOAT_BITS,)))
        if self.kv_bits != FLOAT_BITS:
            raise AbqError("--kv-bits is not implemented yet; leave it at 16")
        head = self.lm_head
        if isinstance(head, str):
            head = parse_layer_scheme(head, what="lm_head scheme")
        if head is not None:
            if not isinstance(head, LayerSpec):
                raise AbqError(f"lm_head must be a LayerSpec or a scheme like 'W8A8', got {head!r}")
            object.__setattr__(self, "lm_head", check_head_layer(head))

    @property
    def layer(self) -> LayerSpec:
        return LayerSpec(self.weight, self.act)

    @property
    def name(self) -> str:
        rot = ROT_NAME if self.rotate else ""
        had = f"{HAD_NAME}{self.hadamard}" if self.hadamard else ""
        had += f":{self.hadamard_layers}" if self.hadamard and self.hadamard_layers != "down" else ""
        return self.layer.name + rot + had + (f"{HEAD_NAME}{self.lm_head.name}" if self.lm_head is not None else "")

    def is_skipped(self, module_name: str) -> bool:
        return any(fnmatch.fnmatchcase(module_name, p) or fnmatch.fnmatchcase(module_name.rsplit(".", 1)[-1], p)
                   for p in self.skip)

    def head_layer(self, module_name: str = "lm_head") -> LayerSpec | None:
        """The output layer's scheme, or None when it stays float: lm_head if set, else the body's unless skipped.

        Refuses the body's scheme with static activation scales (nothing calibrates the output layer's).
        """
        if self.lm_head is not None:
            return self.lm_head
        if self.is_skipped(module_name):
            return None
        if not self.act.is_float and not self.act.dynamic:
            raise AbqError("static activation scales are not supported for lm_head; keep lm_head in --skip or "
                           "give it its own scheme (--lm-head W8A8)")
        return self.layer

    def to_dict(self) -> dict:
        d = {"version": self.version, **self.layer.to_dict(), "skip": list(self.skip), "kv_bits": self.kv_bits}
        if self.lm_head is not None:  # absent otherwise: dicts (checkpoints, cache keys) of head-less specs unchanged
            d["lm_head"] = self.lm_head.to_dict()
        if self.hadamard:  # likewise
            d["hadamard"] = self.hadamard
            if self.hadamard_layers != "down":
                d["hadamard_layers"] = self.hadamard_layers
        if self.rotate:
            d["rotate"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        version = d.get("version")
        if version != FORMAT_VERSION:
            raise AbqError(f"quantization spec version {version!r} is not supported by this abqllm "
                           f"(it reads version {FORMAT_VERSION}); upgrade abqllm or re-quantize")
        layer = LayerSpec.from_dict({k: d[k] for k in ("weight", "act") if k in d})  # the body's hadamard is the spec's
        head = d.get("lm_head")
        if head is not None and not isinstance(head, dict):
            raise AbqError(f"malformed lm_head spec {head!r} in quantization_config; re-quantize the model")
        return cls(layer.weight, layer.act, tuple(d.get("skip", ())), d.get("kv_bits", FLOAT_BITS),
                   lm_head=LayerSpec.from_dict(head) if head is not None else None, hadamard=d.get("hadamard", 0),
                   hadamard_layers=d.get("hadamard_layers", "down"),
                   rotate=bool(d.get("rotate", False)))


_NAME_RE = re.compile(r"^W(\d+)(\*?)A(\d+)(?:G(\d+))?$", re.IGNORECASE)


def parse_layer_scheme(name: str, what: str = "scheme") -> LayerSpec:
    """'W8A8', 'W2*A16', 'W4A16g64' -> LayerSpec (asymmetric weights, dynamic per-token activations)."""
    m = _NAME_RE.match(str(name).strip().replace(" ", ""))
    if not m:
        raise AbqError(f"cannot read {what} {name!r}; write it like W4A8, W2*A16 or W4A16g64")
    w, star, a, g = m.groups()
    try:
        return LayerSpec(WeightSpec(int(w), balanced=bool(star), group_size=int(g or 0)), ActSpec(int(a)))
    except AbqError as e:
        if what == "scheme":
            raise
        hint = re.sub(r" \(use --\w+[^)]*\)$", "", str(e))  # the body's flags (--wbits ...) do not apply
        raise AbqError(f"{what} {name!r}: {hint}") from None


def parse_scheme(name: str) -> QuantSpec:
    """'W4A8', 'W2*A16', 'W4A16g64' -> QuantSpec (asymmetric weights, dynamic per-token activations).

    Suffixes, as spec.name writes them: '+rot' rotates the residual stream first (QuantSpec.rotate),
    '+had:512' adds the online Hadamard on the down projections' input (QuantSpec.hadamard; '+had:512:all'
    on every linear's input), and
    '+head:W8A8' gives the output layer its own scheme (QuantSpec.lm_head): 'W4A4+rot+had:512+head:W8A8'.
    """
    body, *suffixes = str(name).strip().replace(" ", "").split("+")
    layer = parse_layer_scheme(body)
    opts: dict = {}
    for sfx in suffixes:
        key, colon, value = sfx.partition(":")
        key = key.lower()
        if key == "head" and key in opts:
            raise AbqError(f"cannot read lm_head scheme in {name!r}: +head: is given twice")
        if key in opts or key not in ("rot", "had", "head") or (key == "rot" and colon) or (key != "rot" and not colon):
            raise AbqError(f"cannot read scheme {name!r} at {'+' + sfx!r}; the suffixes are +rot, +had:BLOCK and "
                           "+head:SCHEME, e.g. W4A4+rot+had:512+head:W8A8")
        if key == "had":
            block, _, layers = value.partition(":")
            if not block.isdigit():
                raise AbqError(f"cannot read the Hadamard block in {name!r}; write it like W4A4+had:512 "
                               "or W4A4+had:512:all")
            opts["had_layers"] = layers or "down"
            value = block
        opts[key] = value
    return QuantSpec(layer.weight, layer.act, rotate="rot" in opts, hadamard=int(opts.get("had", 0)),
                     hadamard_layers=opts.get("had_layers", "down"),
                     lm_head=parse_layer_scheme(opts["head"], what="lm_head scheme") if "head" in opts else None)
