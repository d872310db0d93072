from abqllm.nn.qlinear import QuantLinear  # noqa: F401
