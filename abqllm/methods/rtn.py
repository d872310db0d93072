"""Round-to-nearest: min/max qparams per channel or group, no calibration of the weights.

It needs data only for static per-tensor activation scales, which it reads off the quantized
stream's inputs to each linear (its calibration result: one (min, max) pair per linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from abqllm.calib.runner import BlockContext
from abqllm.nn.qlinear import QuantLinear
from abqllm.spec import QuantSpec


@dataclass(frozen=True)
class RTN:
    name: str = "rtn"

    def needs_data(self, spec: QuantSpec) -> bool:
        return not spec.act.is_float and not spec.act.dynamic

    def settings(self) -> dict:
        return {}

    def calibrate(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        if not self.needs_data(ctx.spec):
            return {}
        return {f"{n}.act_range": torch.tensor(r) for n, r in ctx.input_ranges(ctx.x_q).items()}

    def apply(self, ctx: BlockContext, result: dict[str, torch.Tensor]) -> dict[str, QuantLinear]:
        def act_range(name):
            r = result.get(f"{name}.act_range")
            return None if r is None else tuple(r.tolist())

        return {name: QuantLinear.from_float(lin, ctx.spec.layer, act_range=act_range(name))
                for name, lin in ctx.linears.items()}
