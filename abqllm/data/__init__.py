"""Calibration and evaluation text: the default Wikipedia text, local files, and hub datasets."""

from abqllm.data.sources import TextSplit, calibration_samples, eval_token_ids, load_text

__all__ = ["TextSplit", "calibration_samples", "eval_token_ids", "load_text"]
