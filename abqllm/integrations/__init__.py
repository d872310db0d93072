"""Other libraries' public extension points.

transformers: after `import abqllm`, `AutoModelForCausalLM.from_pretrained(folder)` loads an abqllm
checkpoint with its weights still packed (transformers_quantizer.py). transformers keeps its
quantizer registry in `transformers.quantizers.auto`, which takes seconds to import (it pulls in the
whole weight-loading machinery), while `import abqllm` should stay cheap. So the registration runs
right after that module is first imported, by from_pretrained itself or by anyone else, or at once
if it already is. The hook is a finder on `sys.meta_path` (Python's import extension point) that
wraps only that one module's loader; nothing in transformers is patched.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys

log = logging.getLogger(__name__)

_TRANSFORMERS_REGISTRY = "transformers.quantizers.auto"


def register_with_transformers() -> None:
    """Make transformers load abqllm checkpoints: now if its registry is imported, else when it is."""
    if _TRANSFORMERS_REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def _register() -> None:
    from abqllm.integrations.transformers_quantizer import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: hands back the real spec of the registry module with a loader that
    registers abqllm once the module has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRANSFORMERS_REGISTRY:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        try:
            _register()
        except Exception as e:  # never break `import transformers` for its other users
            log.warning("abqllm could not register its transformers quantizer: %s", e)

    def __getattr__(self, name):  # get_source, get_data, ...: tracebacks and resources keep working
        return getattr(self._inner, name)
