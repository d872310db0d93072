"""Probe: every method at W8A8 (and +had:512) on the tiny random test model, RMS and max logit error
against the float model. Not part of the test run.

    PYTHONPATH=. python benchmarks/tiny_methods_probe.py
    PYTHONPATH=. python benchmarks/tiny_methods_probe.py '{"compensation": false}'   # abq only, with options
"""
import json
import sys

import torch

import abqllm
from tests.tiny import make_tiny_llama

extra = json.loads(sys.argv[1]) if len(sys.argv) > 1 else None
for method in ["abq"] if extra is not None else ["rtn", "gptq", "smoothquant", "abq", "abq+gptq"]:
    for scheme in ["W8A8"] if extra is not None else ["W8A8", "W8A8+had:512"]:
        model, tok = make_tiny_llama()
        ids = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(ids[:1]).logits
        opts = {"epochs": 1, **(extra or {})} if method.startswith("abq") else {}
        abqllm.quantize(model, scheme, method=method, calib_ids=ids, progress=False, **opts)
        with torch.no_grad():
            out = model(ids[:1]).logits
        print(f"{method:12s} {scheme:14s} {extra or ''} rms {(out - ref).pow(2).mean().sqrt().item():.4f} "
              f"max {(out - ref).abs().max().item():.4f}", flush=True)
