"""abqllm: arbitrary-bit (WpAq) quantization and inference for Hugging Face causal LMs."""

__version__ = "0.1.0"

from abqllm.errors import AbqError  # noqa: E402
from abqllm.spec import ActSpec, LayerSpec, QuantSpec, WeightSpec, parse_scheme  # noqa: E402
from abqllm.api import generate_text, load_model, model_size_bytes, quantize  # noqa: E402
from abqllm.io.checkpoint import load_quantized, save_quantized  # noqa: E402
from abqllm.integrations import register_with_transformers  # noqa: E402
from abqllm.methods.e2e_tuning import E2ETuning, tune_end_to_end  # noqa: E402

# AutoModelForCausalLM.from_pretrained(abqllm checkpoint) works after `import abqllm`.
register_with_transformers()

__all__ = ["AbqError", "ActSpec", "LayerSpec", "QuantSpec", "WeightSpec", "parse_scheme", "quantize",
           "save_quantized", "load_quantized", "load_model", "generate_text", "model_size_bytes", "E2ETuning", "tune_end_to_end", "__version__"]
