"""Round-to-nearest: min/max qparams per channel or group, no calibration of the weights.

It needs data only for static per-tensor activation scales, which it reads off the quantized
stream's inputs to each linear.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantLinear]:
        ranges = ctx.input_ranges(ctx.x_q) if self.needs_data(ctx.spec) else {}
        return {name: QuantLinear.from_float(lin, ctx.spec.layer, act_range=ranges.get(name))
                for name, lin in ctx.linears.items()}
