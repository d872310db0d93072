"""`abq`: thin command line over the public API (abqllm/api.py). Errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

EPILOG = {
    "quantize": "example: abq quantize --model smollm2-135m --wbits 4 --abits 8 --method rtn --out out/w4a8",
    "eval": ("examples: abq eval --model out/w4a8 --json out/w4a8/eval.json   (perplexity);   "
             "abq eval --model out/w4a8 --tasks abq_lastword,abq_nextsent --limit 100 --json out/w4a8/tasks.json "
             "(lm-eval tasks; --tasks list shows them all)"),
    "sweep": ("example: abq sweep --model smollm2-135m --configs 'W8A8,W4A16,W4A8,W3A16,W2*A16,W4A4' --method rtn "
              "--max-windows 16 --out out/sweep   (table + plot of perplexity against bits per weight and size)"),
    "generate": 'example: abq generate --model out/w4a8 --prompt "The capital of France is"',
    "bench": "example: abq bench cpu --model smollm2-135m --configs float,W4A8 --json out/bench.json",
    "bench cpu": ("example: abq bench cpu --model smollm2-135m --configs float,W8A8,W4A16,W4A8,W3A8,W2*A8 "
                  "--prompt-len 128 --new-tokens 128 --threads 2 --json out/cpu_bench.json"),
    "demo": "example: abq demo   (quantize the default model, evaluate float and quantized, print a table)",
    "export": "example: abq export --model out/w4a16g64 --format compressed-tensors --out out/w4a16g64-ct",
    "tune": ("example: abq tune --model out/w4a16 --teacher smollm2-135m --epochs 2 --out out/w4a16-e2e   "
             "(train the scales and norms of a checkpoint against the float model's next-token distribution)"),
    "tune-kernels": ("example: abq tune-kernels --model out/w4a16   (on a GPU: time every kernel on the model's layers "
                     "and make `auto` take the fastest per layer and row count on this GPU model from now on)"),
}


DEFAULT_TUNE_ROWS = (1, 2, 4, 8, 16, 64, 256, 2048)  # as kernels/autotune.DEFAULT_ROWS (kept light: no torch)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def available_kernels() -> list[str]:
    from abqllm.kernels import available  # the registry (light: imports neither triton nor nvcc)
    return available("linear")


def _common(p: argparse.ArgumentParser, model_default: str | None = None):
    p.add_argument("--model", default=model_default, required=model_default is None,
                   help="built-in name (smollm2-135m), local folder (float or abqllm), or hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")


def _data_args(p: argparse.ArgumentParser):
    p.add_argument("--data", default=None,
                   help="wiki (default: held-apart Wikipedia text), a .txt file, wikitext2 or c4 (need `datasets`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="abq", description="Arbitrary-bit (WpAq) quantization for Hugging Face causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log kernel choices and details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a model and save a packed checkpoint", epilog=EPILOG["quantize"])
    _common(q)
    q.add_argument("--wbits", required=True, help="weight bits, 1..8")
    q.add_argument("--abits", default="16", help="activation bits, 2..8, or 16 for weight-only (default 16)")
    q.add_argument("--balanced", action="store_true", help="bit balance: 2^p+1 symmetric levels (W2* = {-2..2})")
    q.add_argument("--group-size", default="0", help="columns per weight group; 0 = per output channel (default)")
    q.add_argument("--sym", action="store_true", help="symmetric weights (default asymmetric with zero points)")
    q.add_argument("--act-static", action="store_true",
                   help="one static activation scale per tensor from calibration data (default: dynamic per token)")
    q.add_argument("--kv-bits", default="16", help="K/V cache bits (only 16 for now)")
    q.add_argument("--rotate", action="store_true",
                   help="rotate the residual stream by a random orthogonal matrix before calibrating (QuaRot's R1; "
                        "offline, no run-time cost; unties lm_head from the embedding)")
    q.add_argument("--hadamard", default="0", metavar="B",
                   help="online block-Hadamard rotation of each down projection's input, blocks of up to B "
                        "columns (a power of two, e.g. 512); spreads the SwiGLU outliers before 4-bit activations. "
                        "0 = off (default). Not exportable to compressed-tensors")
    q.add_argument("--hadamard-layers", default="down", choices=["down", "all"],
                   help="which linears --hadamard rotates the input of: down (each block's down projection, "
                        "default) or all (every linear of the blocks; the best W4A4)")
    q.add_argument("--skip", default="lm_head", help="comma-separated module name patterns left in float")
    q.add_argument("--lm-head", default=None, metavar="SCHEME",
                   help="the output layer's own scheme, round-to-nearest, e.g. W8A8 or W8A16 (wins over --skip); "
                        "float keeps it float (default: as --skip says, i.e. float)")
    q.add_argument("--method", default="rtn", help="calibration method: rtn, abq, gptq, awq, smoothquant, ...")
    q.add_argument("--preset", default=None,
                   help="abq: cpu (minutes on 2 cores), cpu-large (4x the data and time) or paper / paper-long "
                        "(ABQ-LLM recipe, for GPUs); abq+gptq also cpu-large-tuned (cpu-large plus block tuning, "
                        "for 2 bits); default cpu on a CPU, paper on a GPU")
    q.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable, e.g. --method-opt epochs=4 --method-opt use_attn=false")
    q.add_argument("--artifacts", default=None,
                   help="folder for per-block calibration results (default: OUT.calib); rerunning the same "
                        "command resumes from the last finished block")
    _data_args(q)
    q.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default: per method/preset)")
    q.add_argument("--calib-seqlen", type=int, default=None, help="tokens per calibration window (default: per method/preset)")
    q.add_argument("--seed", type=int, default=0, help="seed for calibration sampling")
    q.add_argument("--out", required=True, help="output folder for the checkpoint")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.add_argument("--json", default=None, help="also write the quantization report here")
    q.add_argument("--e2e-epochs", type=int, default=0,
                   help="after calibration, end-to-end tuning of the scales and norms against the float model "
                        "(abq tune), this many epochs over the calibration windows; 0 = off (default)")
    q.add_argument("--e2e-lr", type=float, default=1e-3, help="learning rate of --e2e-epochs (default 1e-3)")

    t = sub.add_parser("tune", help="end-to-end tuning of a quantized checkpoint's scales and norms against the "
                                    "float model (codes stay as they are)", epilog=EPILOG["tune"])
    _common(t)
    t.add_argument("--teacher", required=True, help="the float model the checkpoint was quantized from")
    t.add_argument("--epochs", type=int, default=2, help="passes over the training windows (default 2)")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam step on the log-scales (default 1e-3)")
    t.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    t.add_argument("--holdout", type=float, default=0.125,
                   help="fraction of the windows held out to choose the epoch (default 0.125; 0: keep the last)")
    t.add_argument("--no-norms", action="store_true", help="train the scales only, not the norm weights")
    _data_args(t)
    t.add_argument("--calib-samples", type=int, default=None,
                   help="calibration windows (default: as many as the checkpoint was calibrated on, else 64)")
    t.add_argument("--calib-seqlen", type=int, default=None,
                   help="tokens per window (default: as the checkpoint was calibrated on, else 256)")
    t.add_argument("--seed", type=int, default=None, help="seed for the windows (default: the checkpoint's)")
    t.add_argument("--out", required=True, help="output folder for the tuned checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    t.add_argument("--json", default=None, help="also write the tuning report here")

    e = sub.add_parser("eval", help="perplexity (or lm-eval tasks) of a float or quantized model",
                       epilog=EPILOG["eval"])
    _common(e)
    _data_args(e)
    e.add_argument("--window", type=int, default=1024, help="tokens per evaluation window (default 1024)")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    e.add_argument("--kernel", default="auto", help=f"linear kernel for quantized layers: auto (default) or one of "
                   f"{', '.join(available_kernels())} (docs/kernels.md)")
    e.add_argument("--json", default=None, help="write results here (ppl, tokens, window, data, ...)")
    e.add_argument("--tasks", default=None,
                   help="lm-eval tasks instead of perplexity, comma-separated: abq_lastword, abq_nextsent (local, "
                        "from the evaluation text) or any lm-eval task (hellaswag, arc_easy ...: need the hub); "
                        "'list' prints them")
    e.add_argument("--limit", type=int, default=None, help="lm-eval: only the first N examples of each task")
    e.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples (default: the task's)")
    e.add_argument("--batch-size", type=int, default=1, help="lm-eval: batch size (default 1)")

    g = sub.add_parser("generate", help="greedy text generation", epilog=EPILOG["generate"])
    _common(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--engine", default="auto",
                   help="fast (native C++ decode step, static KV cache), exact (the same, bit-identical to the "
                        "model's forward), python (that step in torch ops), hf (model.generate) or auto (fast on "
                        "CPU where the architecture allows; default)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")

    d = sub.add_parser("demo", help="the main job on the default model: quantize, evaluate, compare",
                       epilog=EPILOG["demo"])
    _common(d, model_default="smollm2-135m")
    d.add_argument("--schemes", default="W4A16g64,W8A8", help="comma-separated schemes (W4A8, W2*A16, W4A16g64 ...)")
    d.add_argument("--method", default="rtn")
    d.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    d.add_argument("--out", default="out/demo", help="where checkpoints and results.json go")

    x = sub.add_parser("export", help="write an abqllm checkpoint in another format (compressed-tensors, for vLLM)",
                       epilog=EPILOG["export"])
    x.add_argument("--model", required=True, help="abqllm checkpoint folder (from abq quantize)")
    x.add_argument("--format", required=True, choices=["compressed-tensors"], help="output format")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    x.add_argument("--json", default=None, help="also write the export report here")
    _bench_args(sub)

    w = sub.add_parser("sweep", help="quantize at several schemes, evaluate each, table + plot of ppl against size",
                       epilog=EPILOG["sweep"])
    _common(w, model_default="smollm2-135m")
    w.add_argument("--configs", default="W8A8,W4A16,W4A8,W3A16,W2*A16,W4A4",
                   help="comma-separated schemes: W8A8, W4A16g64, W2*A16 ... (default W8A8,W4A16,W4A8,W3A16,W2*A16,W4A4)")
    w.add_argument("--method", default="abq", help="calibration method: rtn, abq, gptq, ... (default abq)")
    w.add_argument("--preset", default=None, help="abq: cpu, cpu-large, paper or paper-long; abq+gptq also cpu-large-tuned "
                                                        "(default: cpu on a CPU, paper on a GPU)")
    w.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE", help="method option, repeatable")
    _data_args(w)
    w.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default: per method/preset)")
    w.add_argument("--calib-seqlen", type=int, default=None, help="tokens per calibration window (default: per method/preset)")
    w.add_argument("--seed", type=int, default=0, help="seed for calibration sampling")
    w.add_argument("--window", type=int, default=1024, help="tokens per evaluation window (default 1024)")
    w.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    w.add_argument("--out", default=None, help="results folder (default out/sweep_MODEL_METHOD); finished cells "
                                               "cached there are not computed again")
    w.add_argument("--keep-checkpoints", action="store_true", help="keep each configuration's checkpoint in OUT/work")
    return parser


def _bench_args(sub):
    from abqllm.runtime.bench import DEFAULT_CONFIGS, DEFAULT_GGUF_FORMATS

    k = sub.add_parser("tune-kernels", help="measure the fastest GPU kernel per layer and row count, for `auto`",
                       epilog=EPILOG["tune-kernels"])
    k.add_argument("--model", required=True, help="an abqllm checkpoint folder")
    k.add_argument("--device", default=None, help="cuda, cuda:1 ... (default: cuda)")
    k.add_argument("--rows", default=",".join(map(str, DEFAULT_TUNE_ROWS)),
                   help="input row counts to time (tokens per call: 1 for decode, the prompt length for prefill; "
                        f"default {','.join(map(str, DEFAULT_TUNE_ROWS))})")
    k.add_argument("--dtype", default="float16", help="activation dtype: float16 (default) or bfloat16")
    k.add_argument("--out", default=None, help="write the table here instead of the per-GPU file `auto` reads "
                   "($ABQLLM_CACHE/tables/<gpu>.json)")

    b = sub.add_parser("bench", help="speed and memory benchmarks", epilog=EPILOG["bench"])
    targets = b.add_subparsers(dest="target", required=True, parser_class=_Parser)
    c = targets.add_parser("cpu", help="prefill/decode tokens/s and peak memory on CPU, batch 1, vs llama.cpp",
                           epilog=EPILOG["bench cpu"])
    c.add_argument("--model", default="smollm2-135m", help="built-in name, local float folder or hub id")
    c.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated: float, schemes quantized with RTN on the fly (W4A8, W2*A8, W4A16g64; "
                        "append +head8 for an 8-bit output layer: W8A8 per channel, W8A16 under an A16 body; "
                        "+lm_head: the output layer at the body's scheme), abqllm checkpoint folders, or none "
                        "(llama.cpp only) "
                        f"(default {DEFAULT_CONFIGS})")
    c.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    c.add_argument("--new-tokens", type=int, default=128, help="generated tokens (default 128)")
    c.add_argument("--threads", type=int, default=2, help="threads for torch and llama.cpp (default 2)")
    c.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up; medians reported (default 3)")
    c.add_argument("--rounds", type=int, default=1,
                   help="run every configuration once per round, rounds interleaved in time; report the median "
                        "of the rounds (default 1). Use 3-5 on a shared machine whose speed drifts")
    c.add_argument("--engine", default="fast",
                   help="fast (default), exact, python (see abq generate --help) or hf (model.generate)")
    c.add_argument("--kernel", default="auto", help=f"linear kernel for quantized layers: auto (default) or one of "
                   f"{', '.join(available_kernels())}")
    c.add_argument("--llama-cpp", default="auto",
                   help="auto: also run llama.cpp when llama-cpp-python is installed (default); on; off")
    c.add_argument("--gguf", default=None, help="GGUF of the same model (default: the file smollm2-135m ships as)")
    c.add_argument("--gguf-formats", default=DEFAULT_GGUF_FORMATS,
                   help=f"llama.cpp formats requantized from the GGUF (default {DEFAULT_GGUF_FORMATS})")
    c.add_argument("--work", default="out/bench-cpu", help="where RTN checkpoints and GGUF variants are kept")
    c.add_argument("--json", default=None, help="write the results here")


def _device(arg: str | None) -> str:
    import torch

    if arg:
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


def _write_json(path: str | None, data: dict):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
        print(f"wrote {path}")


def _spec_from_args(a):
    from abqllm.spec import ActSpec, QuantSpec, WeightSpec

    group = a.group_size
    try:
        group = int(group)
    except ValueError:
        pass  # WeightSpec names the problem
    weight = WeightSpec(a.wbits, balanced=a.balanced, group_size=group, symmetric=a.sym)
    skip = tuple(s for s in a.skip.split(",") if s)
    head = _lm_head_arg(getattr(a, "lm_head", None))
    if head == "float" and "lm_head" not in skip:
        skip += ("lm_head",)  # --lm-head float wins over --skip as a scheme does
    had = str(getattr(a, "hadamard", "0")).strip()
    if not had.isdigit():
        from abqllm.errors import AbqError
        raise AbqError(f"--hadamard must be 0 (off) or a power of two such as 512, got {had!r}")
    spec = QuantSpec(weight, ActSpec(a.abits, dynamic=not a.act_static), skip=skip, kv_bits=a.kv_bits,
                     lm_head=None if head in (None, "float") else head, hadamard=int(had),
                     hadamard_layers=getattr(a, "hadamard_layers", "down"),
                     rotate=bool(getattr(a, "rotate", False)))
    spec.head_layer()  # refuses a head scheme that cannot work before the model is loaded
    return spec


def _lm_head_arg(value: str | None):
    """--lm-head: None (not given), 'float', or the head's LayerSpec."""
    from abqllm.errors import AbqError
    from abqllm.spec import parse_layer_scheme

    if value is None:
        return None
    if value.strip().lower() == "float":
        return "float"
    if not value.strip():
        raise AbqError("--lm-head is empty; give a scheme like W8A8 or W8A16, or float")
    try:
        return parse_layer_scheme(value, what="--lm-head")
    except AbqError as e:
        if "cannot read" in str(e):
            raise AbqError(f"cannot read --lm-head {value!r}; give a scheme like W8A8, W8A16 or W6A16g64, "
                           "or float") from None
        raise


def _parse_method_opts(items: list[str]) -> dict:
    """['epochs=4', 'use_attn=false'] -> {'epochs': 4, 'use_attn': False}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            from abqllm.errors import AbqError
            raise AbqError(f"--method-opt takes KEY=VALUE, got {item!r}")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def cmd_quantize(a) -> dict:
    import abqllm
    from abqllm.data.sources import calibration_samples, load_text
    from abqllm.io.checkpoint import check_output_dir
    import torch

    from abqllm.methods import get_method, resolve_preset

    spec = _spec_from_args(a)
    check_output_dir(a.out, a.overwrite)  # before any long work
    device = _device(a.device)
    options, (n_calib, seqlen), preset = resolve_preset(a.method, a.preset, torch.device(device).type)
    options.update(_parse_method_opts(a.method_opt))
    method = get_method(a.method, **options)
    model, tok = abqllm.load_model(a.model, device="cpu")
    if getattr(model.config, "quantization_config", None) is not None:
        raise abqllm.AbqError(f"{a.model} is already quantized; quantize the float model instead")
    calib, data_name = None, None
    if method.needs_data(spec):
        text = load_text(a.data)
        calib = calibration_samples(tok, text, a.calib_samples or n_calib, a.calib_seqlen or seqlen, seed=a.seed)
        data_name = text.name
    artifacts = None
    if method.needs_data(spec) and method.name != "rtn":
        artifacts = a.artifacts or f"{Path(a.out)}.calib"
    if a.e2e_epochs:
        e2e = abqllm.E2ETuning(epochs=a.e2e_epochs, lr=a.e2e_lr)  # refuses bad settings before the calibration
        teacher, _ = abqllm.load_model(a.model, device="cpu")
    report = abqllm.quantize(model, spec, method=a.method, calib_ids=calib, device=device, data=data_name,
                             seed=a.seed, artifacts=artifacts, **options)
    e2e_report = None
    if a.e2e_epochs:
        if calib is None:  # a method without data (rtn): the windows the tuning needs
            text = load_text(a.data)
            calib = calibration_samples(tok, text, a.calib_samples or n_calib, a.calib_seqlen or seqlen, seed=a.seed)
            data_name = text.name
        e2e_report = _run_e2e(model, teacher.to(device), calib, e2e, a.seed, data_name)
        del teacher
    model.to("cpu")
    out = abqllm.save_quantized(model, tok, a.out, overwrite=a.overwrite)
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    result = {"out": str(out), "scheme": report.spec, "method": report.method, "preset": preset,
              "method_settings": method.settings(), "artifacts": artifacts, "layers": report.layers,
              "calib_shape": list(calib.shape) if calib is not None else None,
              "blocks": [vars(b) for b in report.blocks],
              "quantize_seconds": round(report.seconds, 2), "checkpoint_mb": round(size / 2**20, 2)}
    if e2e_report is not None:
        result["e2e_tuning"] = e2e_report
    print(f"saved {report.spec} ({report.method}, {report.layers} layers) to {out}: "
          f"{result['checkpoint_mb']} MB in {result['quantize_seconds']} s")
    _write_json(a.json, result)
    return result


def _run_e2e(model, teacher, calib, cfg, seed: int, data_name: str | None) -> dict:
    from abqllm.methods.e2e_tuning import tune_end_to_end

    report = tune_end_to_end(model, teacher, calib.to(next(model.parameters()).device), cfg, seed=seed)
    model.config.quantization_config["e2e_tuning"]["data"] = data_name
    print(f"end-to-end tuning: held-out KL to the float model {report['kl_before']:.5f} -> {report['kl_after']:.5f} "
          f"(epoch {report['epoch_kept']} of {cfg.epochs}) in {report['seconds']} s")
    return report


def cmd_tune(a) -> dict:
    import abqllm
    from abqllm.data.sources import calibration_samples, load_text
    from abqllm.io.checkpoint import check_output_dir

    cfg = abqllm.E2ETuning(epochs=a.epochs, lr=a.lr, batch=a.batch, holdout=a.holdout, norms=not a.no_norms)
    check_output_dir(a.out, a.overwrite)  # before any long work
    device = _device(a.device)
    model, tok = abqllm.load_model(a.model, device=device)
    qc = getattr(model.config, "quantization_config", None)
    if not isinstance(qc, dict) or "layers" not in qc:
        raise abqllm.AbqError(f"{a.model} is not an abqllm checkpoint; quantize it first (abq quantize ... --out DIR) "
                              "and tune DIR")
    teacher, _ = abqllm.load_model(a.teacher, device=device)
    if getattr(teacher.config, "quantization_config", None) is not None:
        raise abqllm.AbqError(f"--teacher {a.teacher} is quantized; the teacher is the float model the checkpoint "
                              "was quantized from")
    shape = qc.get("calib_shape") or [64, 256]
    seed = a.seed if a.seed is not None else int(qc.get("seed") or 0)
    text = load_text(a.data)
    calib = calibration_samples(tok, text, a.calib_samples or shape[0], a.calib_seqlen or shape[1], seed=seed)
    report = _run_e2e(model, teacher, calib, cfg, seed, text.name)
    model.to("cpu")
    out = abqllm.save_quantized(model, tok, a.out, overwrite=a.overwrite)
    result = {"model": a.model, "teacher": a.teacher, "out": str(out), "scheme": qc["spec"], **report,
              "data": text.name}
    print(f"saved the tuned checkpoint to {out}")
    _write_json(a.json, result)
    return result


def evaluate(model_name: str, data: str | None, window: int, max_windows: int | None, device: str,
             kernel: str = "auto") -> dict:
    import abqllm
    from abqllm.data.sources import eval_token_ids, load_text
    from abqllm.eval.perplexity import perplexity
    from abqllm.nn.qlinear import QuantLinear

    text = load_text(data)
    model, tok = abqllm.load_model(model_name, device=device)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = kernel
    ids = eval_token_ids(tok, text)
    res = perplexity(model, ids, window=window, max_windows=max_windows)
    qc = getattr(model.config, "quantization_config", None)
    return {"model": model_name, "scheme": qc["spec"] if isinstance(qc, dict) else "float",
            "method": qc.get("method") if isinstance(qc, dict) else None,
            **res.to_dict(), "data": text.name, "split": text.description, "device": device,
            "size_mb": round(abqllm.model_size_bytes(model) / 2**20, 2)}


def cmd_eval(a) -> dict:
    if a.tasks:
        return _eval_tasks(a)
    r = evaluate(a.model, a.data, a.window, a.max_windows, _device(a.device), a.kernel)
    print(f"{a.model}: perplexity {r['ppl']:.4f} over {r['tokens']} tokens ({r['windows']} windows of "
          f"{r['window']}) on {r['data']}")
    _write_json(a.json, r)
    return r


def _eval_tasks(a) -> dict:
    import abqllm
    from abqllm.eval import harness
    from abqllm.nn.qlinear import QuantLinear

    if a.tasks.strip() == "list":
        print("\n".join(harness.available_tasks()))
        return {}
    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    manager = harness.task_manager(names)
    tasks = harness.load_tasks(harness.resolve_tasks(names, manager), manager)  # before loading the model
    model, tok = abqllm.load_model(a.model, device=_device(a.device))
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = a.kernel
    r = harness.run_tasks(model, tok, tasks, limit=a.limit, num_fewshot=a.num_fewshot, batch_size=a.batch_size,
                          manager=manager)
    qc = getattr(model.config, "quantization_config", None)
    r = {"model": a.model, "scheme": qc["spec"] if isinstance(qc, dict) else "float",
         "method": qc.get("method") if isinstance(qc, dict) else None, "tasks": names, **r}
    print(harness.format_table(r))
    _write_json(a.json, r)
    return r


def cmd_generate(a) -> dict:
    import abqllm

    model, tok = abqllm.load_model(a.model, device=_device(a.device))
    text = abqllm.generate_text(model, tok, a.prompt, a.max_new_tokens, chat=a.chat, engine=a.engine,
                                temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    print(a.prompt + text)
    return {"prompt": a.prompt, "completion": text}


def cmd_tune_kernels(a) -> dict:
    import torch

    from abqllm.errors import AbqError
    from abqllm.io.checkpoint import load_quantized
    from abqllm.kernels import autotune
    from abqllm.models.hub import is_quantized_checkpoint

    try:
        rows = sorted({int(r) for r in a.rows.split(",") if r.strip()})
    except ValueError:
        raise AbqError(f"--rows takes positive integers separated by commas, got {a.rows!r}") from None
    if not rows or rows[0] < 1:
        raise AbqError(f"--rows takes positive integers separated by commas, got {a.rows!r}")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(a.dtype)
    if dtype is None:
        raise AbqError(f"--dtype must be float16 or bfloat16, got {a.dtype!r}")
    if not (Path(a.model).is_dir() and is_quantized_checkpoint(a.model)):
        raise AbqError(f"{a.model} is not an abqllm checkpoint folder; quantize first (abq quantize ... --out DIR)")
    device = torch.device(a.device or "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise AbqError(f"tune-kernels measures a GPU and needs CUDA (device {device}); dispatch tables are per GPU "
                       "model, and on the CPU `auto` takes the CPU kernels")
    model, _ = load_quantized(a.model, dtype=dtype, device="cpu")
    layers = autotune.distinct_layers(model)
    if not layers:
        raise AbqError(f"{a.model} has no quantized layers to tune")
    print(f"timing {len(layers)} distinct layers x {len(rows)} row counts on {torch.cuda.get_device_name(device)}")
    table = autotune.tune_layers(layers, device, rows=rows, dtype=dtype)
    table["source"] = f"abq tune-kernels --model {a.model}"
    path = autotune.save_table(table, a.out)
    print(autotune.format_rules(table))
    print(f"wrote {path}" + ("" if a.out else ": `auto` now takes these kernels on this GPU model "
                             "(ABQLLM_DISPATCH_TABLE=off ignores the tables)"))
    return table


def cmd_bench(a) -> dict:
    from abqllm.runtime.bench import BenchSettings, format_table, run_cpu_bench

    s = BenchSettings(model=a.model, configs=a.configs, prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                      threads=a.threads, runs=a.runs, rounds=a.rounds, engine=a.engine, kernel=a.kernel,
                      work=a.work, llama_cpp=a.llama_cpp, gguf=a.gguf, gguf_formats=a.gguf_formats)
    result = run_cpu_bench(s, log=lambda msg: print(msg, flush=True))
    result["command"] = (f"abq bench cpu --model {a.model} --configs '{a.configs}' --prompt-len {a.prompt_len} "
                         f"--new-tokens {a.new_tokens} --threads {a.threads} --runs {a.runs} --rounds {a.rounds} "
                         f"--engine {a.engine} "
                         f"--llama-cpp {a.llama_cpp} --gguf-formats {a.gguf_formats}")
    print(format_table(result))
    _write_json(a.json, result)
    return result


def cmd_demo(a) -> dict:
    from abqllm.spec import parse_scheme

    device = _device(a.device)
    schemes = [parse_scheme(s) for s in a.schemes.split(",") if s]  # all validated before any work
    rows = []
    t0 = time.perf_counter()
    fp = evaluate(a.model, None, 1024, a.max_windows, device)
    rows.append({"config": "float", "ppl": fp["ppl"], "ratio": 1.0, "size_mb": fp["size_mb"],
                 "quantize_s": 0.0, "eval_s": fp["seconds"]})
    for spec in schemes:
        out = Path(a.out) / spec.name.replace("*", "s").replace(":", "-")
        qa = argparse.Namespace(model=a.model, device=a.device, wbits=spec.weight.bits, abits=spec.act.bits,
                                balanced=spec.weight.balanced, group_size=spec.weight.group_size, sym=False,
                                act_static=False, kv_bits=16, skip="lm_head", method=a.method, data=None,
                                lm_head=spec.lm_head.name if spec.lm_head is not None else None,
                                calib_samples=None, calib_seqlen=None, seed=0, out=str(out), overwrite=True, json=None,
                                preset=None, method_opt=[], artifacts=None)
        qr = cmd_quantize(qa)
        ev = evaluate(str(out), None, 1024, a.max_windows, device)
        rows.append({"config": f"{spec.name} {a.method}", "ppl": ev["ppl"], "ratio": ev["ppl"] / fp["ppl"],
                     "size_mb": qr["checkpoint_mb"], "quantize_s": qr["quantize_seconds"], "eval_s": ev["seconds"]})
    print(f"\n{'config':<18}{'perplexity':>12}{'x float':>9}{'size MB':>10}{'quantize s':>12}{'eval s':>9}")
    for r in rows:
        print(f"{r['config']:<18}{r['ppl']:>12.3f}{r['ratio']:>9.3f}{r['size_mb']:>10.1f}"
              f"{r['quantize_s']:>12.1f}{r['eval_s']:>9.1f}")
    result = {"model": a.model, "data": fp["data"], "split": fp["split"], "window": 1024, "tokens": fp["tokens"],
              "rows": rows, "total_seconds": round(time.perf_counter() - t0, 1)}
    _write_json(str(Path(a.out) / "results.json"), result)
    return result


def cmd_sweep(a) -> dict:
    from abqllm.sweep import SweepSettings, run_sweep

    configs = tuple(c.strip() for c in a.configs.split(",") if c.strip())
    out = a.out or f"out/sweep_{Path(a.model).name}_{a.method}"
    s = SweepSettings(model=a.model, configs=configs, method=a.method, preset=a.preset,
                      method_opts=_parse_method_opts(a.method_opt), data=a.data, calib_samples=a.calib_samples,
                      calib_seqlen=a.calib_seqlen, seed=a.seed, window=a.window, max_windows=a.max_windows,
                      device=_device(a.device), out=out, keep_checkpoints=a.keep_checkpoints)
    result = run_sweep(s, log=lambda msg: print(msg, flush=True))
    print((Path(out) / "sweep.md").read_text())
    print(f"wrote {out}/sweep.csv, sweep.json, sweep.md and sweep.png")
    return result


def cmd_export(a) -> dict:
    from dataclasses import asdict

    from abqllm.export.compressed_tensors import export_compressed_tensors

    report = asdict(export_compressed_tensors(a.model, a.out, overwrite=a.overwrite))
    print(f"exported {a.model} to {report['out']} ({a.format}, {', '.join(report['formats'])}): "
          + "; ".join(f"{scheme} x{len(names)}" for scheme, names in report["schemes"].items()))
    for note in report["notes"]:
        print(f"note: {note}")
    _write_json(a.json, report)
    return report


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate, "demo": cmd_demo,
            "export": cmd_export, "bench": cmd_bench, "sweep": cmd_sweep, "tune": cmd_tune,
            "tune-kernels": cmd_tune_kernels}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("abqllm").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from abqllm.errors import AbqError

    try:
        COMMANDS[args.command](args)
    except AbqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
