"""abqllm checkpoints through `AutoModelForCausalLM.from_pretrained`, via transformers' registry.

    import abqllm                                   # registers quant_method "abqllm"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/w4a8")

transformers reads `quantization_config` from config.json, builds `AbqQuantizationConfig` from it
and hands the model skeleton (on the meta device) to `AbqHfQuantizer`, which swaps every layer the
checkpoint lists for a `QuantLinear` of that layer's own spec before any weight is read. The
checkpoint's tensors (int32 `qweight`, float16 `scales`, uint8 `zeros`, ...) then load straight into
those buffers: the weights stay packed in memory and run through the same kernels as
`abqllm.load_model`. Layers the checkpoint does not list (the skip list, e.g. lm_head) stay float.
As in `abqllm.load_quantized`, the format version, the spec version and the size and sha256 of
every tensor file are checked first.

Import this module only through abqllm.integrations (it imports transformers' quantizer registry,
which is slow to import).
"""

from __future__ import annotations

from pathlib import Path

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from abqllm.errors import AbqError
from abqllm.io.checkpoint import CHECKPOINT_VERSION, QUANT_METHOD, WEIGHTS, verify_files
from abqllm.nn.qlinear import QuantLinear
from abqllm.spec import LayerSpec, QuantSpec


class AbqQuantizationConfig(QuantizationConfigMixin):
    """The checkpoint's `quantization_config` block, kept whole (to_dict gives it back unchanged)."""

    def __init__(self, **config):
        self.__dict__.update(config)
        self.quant_method = QUANT_METHOD
        if config.get("format_version") != CHECKPOINT_VERSION:
            raise AbqError(f"abqllm checkpoint format version {config.get('format_version')!r}; this abqllm reads "
                           f"version {CHECKPOINT_VERSION}: upgrade abqllm or re-quantize")
        QuantSpec.from_dict(config.get("spec", {}))  # refuses unknown spec versions
        self.layer_specs()  # refuses malformed layer specs before any work

    def layer_specs(self) -> dict[str, LayerSpec]:
        return {name: LayerSpec.from_dict(d) for name, d in (getattr(self, "layers", None) or {}).items()}


class AbqHfQuantizer(HfQuantizer):
    requires_calibration = True  # loads abqllm checkpoints; quantizing happens in abqllm.quantize
    quantization_config: AbqQuantizationConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        qc = self.quantization_config
        files = [Path(f) for f in checkpoint_files or []]
        if files:
            verify_files(files[0].parent, qc.to_dict())
            if {f.name for f in files} != {WEIGHTS}:
                raise AbqError(f"{files[0].parent}: expected one {WEIGHTS}, found {[f.name for f in files]}; "
                               "the checkpoint is not as abqllm wrote it, re-save it")
        for name, spec in qc.layer_specs().items():
            try:
                lin = model.get_submodule(name)
            except AttributeError:
                raise AbqError(f"layer {name} in quantization_config does not exist in the model") from None
            model.set_submodule(name, QuantLinear(lin.in_features, lin.out_features, spec,
                                                  bias=lin.bias is not None, dtype=lin.weight.dtype))
        return model

    def is_serializable(self) -> bool:
        # The checkpoint folder is already the saved form; re-saving through transformers would
        # write tensor files whose sizes and hashes no longer match the recorded ones.
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Idempotent: registering twice (a second import path, a reload) is not an error."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(AbqQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(AbqHfQuantizer)
