"""Methods made of an equivalent transform followed by a rounding method.

Supported names (registered in abqllm/methods/__init__.py):
    smoothquant        SmoothQuant scales, then round-to-nearest
    awq                AWQ scales (+ clips), then round-to-nearest
    smoothquant+gptq   SmoothQuant scales, then GPTQ on the transformed weights
    awq+gptq           AWQ scales (+ clips), then GPTQ on the transformed (and clipped) weights
    abq+gptq           ABQ's trained transforms and compensation folded, then GPTQ rounding with
                       ABQ's learned clipping ranges as fixed scales and zero points, and GPTQ's
                       asymmetric calibration (asym=0.25 unless given; COMPOSED_DEFAULTS)
With tune_epochs > 0 (abq+gptq, awq+gptq, smoothquant+gptq), the codes are then kept and the scales and norm
weights trained block-wise against the float block (methods/block_tuning.py).
The transform always comes first and the rounding last (gptq+awq makes no sense: GPTQ's output is
already rounded). smoothquant+awq is not offered: both are scalings of the same channels.

calibrate: search the transform on the float block, fold it into a copy of the block, run the
rounding method's calibration on that copy (GPTQ's Hessians then see the transformed inputs; static
activation ranges are measured after the transform). apply: fold the same transform into the real
block, then let the rounding method build the QuantLinears. The result holds both methods' tensors
("smooth.*", "clip.*" from the transform; "<linear>.*" from the rounding).
Options go to whichever part has a field of that name: get_method("awq+gptq", n_grid=10, act_order=True).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from abqllm.calib.runner import BlockContext
from abqllm.methods.abq import ABQ
from abqllm.methods.awq import AWQ
from abqllm.methods.block_tuning import BlockTuning, apply_tuned
from abqllm.methods.gptq import GPTQ
from abqllm.methods.rtn import RTN
from abqllm.methods.smoothquant import SmoothQuant
from abqllm.nn.qlinear import QuantLinear
from abqllm.spec import QuantSpec

TRANSFORMS = {"smoothquant": SmoothQuant, "awq": AWQ, "abq": ABQ}
ROUNDINGS = {"rtn": RTN, "gptq": GPTQ}
# Defaults of a composition that differ from its parts' own. abq+gptq rounds with GPTQ's asymmetric
# calibration at 0.25 (16x256 calibration, +had:512 where named; README "Measured"): W3A16g64 33.75 ->
# 33.22, W4A16+had 25.11 -> 24.42, W4A8+had 24.96 -> 24.54, W2*A16+had 84.55 -> 66.88. Plain `gptq`
# stays the published method (asym 0).
COMPOSED_DEFAULTS = {"abq+gptq": {"asym": 0.25}}
# Block tuning in the cpu-large-tuned preset: W2*A16 +had 54.07 -> 49.61, W2*A8 +had 53.26 -> 47.29 (64 x 256)
TUNED_PRESET = {"tune_epochs": 4, "tune_lr": 1e-2}


@dataclass(frozen=True)
class Composed:
    name: str
    transform: SmoothQuant | AWQ | ABQ
    rounding: RTN | GPTQ
    tuning: BlockTuning = BlockTuning()

    @property
    def needs_attention_maps(self) -> bool:
        return getattr(self.transform, "needs_attention_maps", False)

    def needs_data(self, spec: QuantSpec) -> bool:
        return True

    def settings(self) -> dict:
        return {"transform": self.transform.name, **self.transform.settings(),
                "rounding": self.rounding.name, **self.rounding.settings(), **self.tuning.settings()}

    def calibrate(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        found = self.transform.search(ctx)
        if not self.rounding.needs_data(ctx.spec):  # RTN with dynamic activations: nothing to measure
            return found
        work = copy.deepcopy(ctx.block)
        self.transform.fold(work, ctx, found)
        inner = dataclasses.replace(ctx, block=work, linears={n: work.get_submodule(n) for n in ctx.linears})
        # code tuning starts from where GPTQ rounded each weight (not kept in the result: weight-sized)
        extra = {"positions": {}} if self.tuning.enabled and self.tuning.tune_codes_lr else {}
        if hasattr(self.transform, "qparams"):  # learned ranges (abq): the rounding keeps them
            extra["qparams"] = self.transform.qparams(work, inner, found)
        rounded = self.rounding.calibrate(inner, **extra)
        if self.tuning.enabled:
            rounded.update(self.tuning.tune(ctx, inner, rounded, extra.get("positions")))
        return {**found, **rounded}

    def apply(self, ctx: BlockContext, result: dict[str, torch.Tensor]) -> dict[str, QuantLinear]:
        self.transform.fold(ctx.block, ctx, result)
        apply_tuned(ctx.block, result)  # tuned norm weights, if any
        return self.rounding.apply(ctx, result)  # ctx.linears are the block's, now transformed


def composed(name: str):
    """Factory for get_method: 'awq' -> AWQ then RTN, 'awq+gptq' -> AWQ then GPTQ."""
    transform_name, _, rounding_name = name.partition("+")
    t_cls, r_cls = TRANSFORMS[transform_name], ROUNDINGS[rounding_name or "rtn"]

    def build(**options) -> Composed:
        classes = (t_cls, r_cls, BlockTuning) if r_cls is GPTQ else (t_cls, r_cls)
        fields = {cls: {f.name for f in dataclasses.fields(cls)} - {"name"} for cls in classes}
        known = set().union(*fields.values())
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unexpected option(s) {', '.join(unknown)}; {name} takes "
                            f"{', '.join(sorted(known)) or 'none'}")
        options = {**COMPOSED_DEFAULTS.get(name, {}), **options}
        parts = [cls(**{k: v for k, v in options.items() if k in fields[cls]}) for cls in classes]
        return Composed(name, *parts)

    build.presets = dict(getattr(t_cls, "presets", {}))  # abq+gptq takes abq's presets
    if r_cls is GPTQ and "cpu-large" in build.presets:
        # cpu-large plus block tuning: the recipe that met the 2-bit targets (README "Block tuning")
        options, data = build.presets["cpu-large"]
        build.presets["cpu-large-tuned"] = ({**options, **TUNED_PRESET}, data)
    return build
