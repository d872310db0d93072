"""`abq bench cpu`: prefill and decode tokens/s and peak memory per configuration, batch 1.

Each configuration runs in a fresh Python process (`python -m abqllm.runtime.bench worker ...`), so
its peak resident memory (VmHWM) is its own: imports, model load, warm-up, runs.
Quantized configurations are made with RTN once in the parent and saved as packed checkpoints
under the work folder (reused when already there); a configuration may also be a checkpoint folder.

Protocol: the prompt is the first `prompt_len` token ids of a fixed English text (the same ids go to
llama.cpp); one warm-up generation, then `runs` timed generations of `new_tokens` tokens, greedy,
EOS ignored. Prefill tokens/s = prompt_len / time of the prompt forward; decode tokens/s =
(new_tokens - 1) one-token steps / their time (the first new token comes from the prefill);
both are medians over the runs.

When llama-cpp-python is installed and a GGUF is known (the file the default model ships as, or
--gguf), llama.cpp runs the same ids at the same thread count in its own process, for that file and
for variants requantized from it with llama_model_quantize (kept in the work folder).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from abqllm.errors import AbqError

DEFAULT_CONFIGS = "float,W8A8,W4A16,W4A8,W3A8,W2*A8"
DEFAULT_GGUF_FORMATS = "Q4_1,Q8_0,Q4_0,Q2_K"
# llama.cpp's llama_ftype values (include/llama.h); the names are the `llama-quantize` ones.
GGUF_FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
               "Q3_K_S": 11, "Q3_K_M": 12, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}
HEAD_SUFFIX = "+lm_head"  # W4A8+lm_head: the output layer quantized too, at the body's scheme (quantize --skip '')
# W4A8+head8: the output layer at 8-bit per-channel weights (quantize --lm-head W8A8), with 8-bit per-token
# activations when the body quantizes activations (any A2..A8) and float ones (W8A16) under an A16 body.
# +headN takes other weight bits the same way; W4A8+head:W8A16 (spec.name's form) names the head exactly.
HEAD_BITS_RE = re.compile(r"^(.*)\+head(\d+)$", re.IGNORECASE)

PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from those used for wine and paper. "
    "Within a few decades, presses had spread to more than two hundred cities across Europe, and the price "
    "of books fell so far that ordinary merchants and craftsmen could own them. Scholars argue about how "
    "much of the Reformation, the scientific revolution and the rise of vernacular literature can be "
    "credited to this single invention, but few doubt that the speed at which ideas could travel changed "
    "for good. Printers became publishers, editors and booksellers at once, and their workshops were "
    "meeting places for authors, translators and readers. "
)


@dataclass
class BenchSettings:
    model: str = "smollm2-135m"
    configs: str = DEFAULT_CONFIGS
    prompt_len: int = 128
    new_tokens: int = 128
    threads: int = 2
    runs: int = 3
    rounds: int = 1  # >1: every configuration (ours and llama.cpp) once per round, rounds interleaved in time
    engine: str = "fast"  # fast, exact, python (abqllm.runtime.cpu_decode.ENGINES) or hf (model.generate)
    kernel: str = "auto"
    work: str = "out/bench-cpu"
    llama_cpp: str = "auto"  # auto (when installed), on (required), off
    gguf: str | None = None  # GGUF of the same model; default: the one the default model ships as
    gguf_formats: str = DEFAULT_GGUF_FORMATS


def _check(s: BenchSettings):
    if s.prompt_len < 1 or s.new_tokens < 2:
        raise AbqError(f"need --prompt-len >= 1 and --new-tokens >= 2, got {s.prompt_len} and {s.new_tokens}")
    if s.threads < 1 or s.runs < 1 or s.rounds < 1:
        raise AbqError(f"--threads, --runs and --rounds must be >= 1, got {s.threads}, {s.runs} and {s.rounds}")
    if s.engine not in ("fast", "exact", "python", "hf"):
        raise AbqError(f"--engine must be fast, exact, python or hf, got {s.engine!r}")
    if s.llama_cpp not in ("auto", "on", "off"):
        raise AbqError(f"--llama-cpp must be auto, on or off, got {s.llama_cpp!r}")
    for f in _split(s.gguf_formats):
        if f not in GGUF_FTYPES:
            raise AbqError(f"unknown GGUF format {f!r}; choose from {', '.join(GGUF_FTYPES)}")
    if s.gguf and not Path(s.gguf).is_file():
        raise AbqError(f"--gguf {s.gguf} is not a file")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_configs(text: str) -> list[dict]:
    """'float,W4A8,W4A8+head8,W4A8+lm_head,path/to/ckpt' -> [{'name', 'kind', 'spec'|'path'}]; validates all."""
    from abqllm.spec import QuantSpec, parse_scheme

    out = []
    if text.strip() == "none":  # llama.cpp only
        return out
    for name in _split(text):
        if name == "float":
            out.append({"name": name, "kind": "float"})
        elif Path(name).is_dir():
            out.append({"name": name, "kind": "checkpoint", "path": name})
        else:
            out.append({"name": name, "kind": "rtn", "spec": config_spec(name)})
    if not out:
        raise AbqError("--configs is empty; e.g. --configs float,W4A8 (or none: llama.cpp only)")
    return out


def config_spec(name: str):
    """The QuantSpec of a --configs scheme entry: W4A8, W4A8+lm_head, W4A8+head8, W4A8+head:W8A16."""
    from abqllm.spec import ActSpec, LayerSpec, QuantSpec, WeightSpec, parse_scheme

    if name.endswith(HEAD_SUFFIX):
        spec = parse_scheme(name[: -len(HEAD_SUFFIX)])
        if spec.lm_head is not None:
            raise AbqError(f"config {name!r} gives lm_head two schemes; use either +lm_head or +head...")
        return dataclasses.replace(spec, skip=())  # keeps +rot / +had
    m = HEAD_BITS_RE.match(name.strip())
    if not m:
        return parse_scheme(name)
    spec = parse_scheme(m.group(1))
    if spec.lm_head is not None:
        raise AbqError(f"config {name!r} gives lm_head two schemes; use either +head{m.group(2)} or +head:SCHEME")
    try:
        weight = WeightSpec(int(m.group(2)))
    except AbqError as e:
        hint = re.sub(r" \(use --\w+[^)]*\)$", "", str(e))
        raise AbqError(f"config {name!r}: lm_head {hint}") from None
    head = LayerSpec(weight, ActSpec(16 if spec.act.is_float else 8))
    return dataclasses.replace(spec, lm_head=head)


def prompt_ids(tokenizer, n: int) -> list[int]:
    text = PROMPT_TEXT
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < n:
        text += PROMPT_TEXT
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:n]


def _rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory in MiB.

    Not getrusage's ru_maxrss: Linux carries it across fork + exec, so a child would report its
    parent's peak whenever the parent was larger.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # fallback off Linux
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024  # bytes on macOS


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- workers (child processes)

def worker_abqllm(job: dict) -> dict:
    """One configuration of our model in this (fresh) process."""
    import torch

    torch.set_num_threads(job["threads"])
    import abqllm
    from abqllm.kernels import registry
    from abqllm.nn.qlinear import QuantLinear

    base_rss = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    model, _ = abqllm.load_model(job["model"])
    load_s = time.perf_counter() - t0
    kernels = set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = job["kernel"]
            kernels.add(registry.select("linear", m.kernel, m, torch.device("cpu")).name)
    ids = job["ids"]
    n_new = job["new_tokens"]
    if job["engine"] != "hf":
        from abqllm.runtime.cpu_decode import decoder_for

        dec = decoder_for(model, job["engine"], len(ids) + n_new)
        step = "native" if dec.native is not None else f"python ({dec.native_reason})"
        dec.generate(ids, min(n_new, 8), ignore_eos=True)  # warm-up: dequant caches, allocator
        runs = []
        for _ in range(job["runs"]):
            r = dec.generate(ids, n_new, ignore_eos=True)
            runs.append({"prefill_s": r.prefill_seconds, "decode_s": r.decode_seconds, "steps": r.decode_steps,
                         "tokens": r.tokens})
    else:
        step = "model.generate"
        runs = _hf_runs(model, ids, n_new, job["runs"])
    prefill = [len(ids) / r["prefill_s"] for r in runs]
    decode = [r["steps"] / r["decode_s"] for r in runs]
    return {"prefill_tok_s": _median(prefill), "decode_tok_s": _median(decode),
            "prefill_tok_s_runs": prefill, "decode_tok_s_runs": decode,
            "peak_rss_mb": _rss_mb(), "base_rss_mb": base_rss, "end_rss_mb": _rss_mb("VmRSS"), "load_s": load_s,
            "model_mb": abqllm.model_size_bytes(model) / 2**20, "kernels": sorted(kernels),
            "torch_threads": torch.get_num_threads(), "first_tokens": runs[-1]["tokens"][:16], "decode_step": step}


def _hf_runs(model, ids: list[int], n_new: int, n_runs: int) -> list[dict]:
    """model.generate: prefill = a 1-token generate, decode = the rest of an n_new-token generate."""
    import torch

    x = torch.tensor([ids])
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0)

    def gen(n):
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t, out[0, len(ids):].tolist()

    gen(min(n_new, 8))
    runs = []
    for _ in range(n_runs):
        t1, _ = gen(1)
        tn, toks = gen(n_new)
        runs.append({"prefill_s": t1, "decode_s": max(tn - t1, 1e-9), "steps": n_new - 1, "tokens": toks})
    return runs


def worker_llama_cpp(job: dict) -> dict:
    """One GGUF file through llama-cpp-python in this (fresh) process."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    base_rss = _rss_mb("VmRSS")
    ids, n_new, threads = job["ids"], job["new_tokens"], job["threads"]
    t0 = time.perf_counter()
    llm = Llama(model_path=job["gguf"], n_ctx=len(ids) + n_new + 8, n_batch=max(len(ids), 32), n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0

    n_vocab = llm.n_vocab()

    def greedy() -> int:  # the last position's logits, read from the context (Llama.scores is left empty)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def run(n):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t
        tok = greedy()
        toks = [tok]
        t = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = greedy()
            toks.append(tok)
        return {"prefill_s": prefill, "decode_s": time.perf_counter() - t, "steps": n - 1, "tokens": toks}

    run(min(n_new, 8))
    runs = [run(n_new) for _ in range(job["runs"])]
    prefill = [len(ids) / r["prefill_s"] for r in runs]
    decode = [r["steps"] / r["decode_s"] for r in runs]
    return {"prefill_tok_s": _median(prefill), "decode_tok_s": _median(decode),
            "prefill_tok_s_runs": prefill, "decode_tok_s_runs": decode,
            "peak_rss_mb": _rss_mb(), "base_rss_mb": base_rss, "end_rss_mb": _rss_mb("VmRSS"), "load_s": load_s,
            "file_mb": Path(job["gguf"]).stat().st_size / 2**20, "llama_cpp_python": llama_cpp.__version__,
            "first_tokens": runs[-1]["tokens"][:16]}


WORKERS = {"abqllm": worker_abqllm, "llama_cpp": worker_llama_cpp}


def _spawn(kind: str, job: dict, timeout: float = 3600) -> dict:
    """Run a worker in a fresh interpreter; its last stdout line is the JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]))
    cmd = [sys.executable, "-m", "abqllm.runtime.bench", "worker", kind, json.dumps(job)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"error": f"worker exited {p.returncode}: {tail}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- the parent

def _prepare_checkpoint(cfg: dict, s: BenchSettings, log) -> tuple[str, float]:
    """Folder of an RTN checkpoint for cfg (made once, then reused); seconds spent quantizing."""
    import abqllm
    from abqllm.models.hub import is_quantized_checkpoint

    spec = cfg["spec"]
    tag = Path(s.model).name if Path(s.model).is_dir() else s.model.replace("/", "_")
    folder = Path(s.work) / tag / cfg["name"].replace("*", "s").replace("+", "_").replace(":", "-")
    if is_quantized_checkpoint(folder):
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        if qc.get("spec") == spec.to_dict() and qc.get("method") == "rtn":
            log(f"{cfg['name']}: reusing {folder}")
            return str(folder), 0.0
    log(f"{cfg['name']}: quantizing with RTN into {folder}")
    model, tok = abqllm.load_model(s.model)
    t = time.perf_counter()
    abqllm.quantize(model, spec, method="rtn", progress=False)
    seconds = time.perf_counter() - t
    abqllm.save_quantized(model, tok, folder, overwrite=True)
    return str(folder), seconds


def _gguf_variants(s: BenchSettings, log) -> list[tuple[str, str]]:
    """[(format, path)]: the source GGUF under its own format name, and requantized variants."""
    src = Path(s.gguf) if s.gguf else _default_gguf(s.model)
    if src is None:
        log("llama.cpp: no GGUF for this model (pass --gguf FILE); skipped")
        return []
    src_format = _gguf_format(src)
    out = [(src_format, str(src))]
    folder = Path(s.work) / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    for fmt in _split(s.gguf_formats):
        if fmt == src_format:
            continue
        dst = folder / f"{src.stem}.from-{src_format}.{fmt}.gguf"
        if not dst.is_file():
            log(f"llama.cpp: requantizing {src.name} to {fmt}")
            try:
                _quantize_gguf(src, dst, fmt, s.threads)
            except AbqError as e:
                log(f"llama.cpp: {fmt} skipped ({e})")
                continue
        out.append((fmt, str(dst)))
    return out


def _default_gguf(model: str) -> Path | None:
    from abqllm.models import hub

    if model.lower() != hub.DEFAULT_MODEL:
        return None
    return hub._smollm2_gguf()


def _gguf_format(path: Path) -> str:
    """The file's general.file_type as a llama-quantize name (e.g. Q4_1), or 'source'."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return "source"
    value = int(field.parts[field.data[0]][0])
    return next((k for k, v in GGUF_FTYPES.items() if v == value), f"ftype{value}")


def _gguf_tensor_types(path: str) -> dict[str, int]:
    from collections import Counter

    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors))


def _quantize_gguf(src: Path, dst: Path, fmt: str, threads: int):
    """llama_model_quantize (the C API behind llama-quantize), writing dst atomically."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_FTYPES[fmt]
    params.nthread = threads
    params.allow_requantize = True  # the source is already quantized: it is dequantized to f32 first
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0 or not tmp.is_file():
            raise AbqError(f"llama_model_quantize returned {rc}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def run_cpu_bench(s: BenchSettings, log=print) -> dict:
    _check(s)
    configs = parse_configs(s.configs)  # all validated before any work
    use_llama = s.llama_cpp == "on" or (s.llama_cpp == "auto" and llama_cpp_available())
    if not configs and not use_llama:
        raise AbqError("--configs none leaves nothing to run without llama.cpp")
    if s.llama_cpp == "on" and not llama_cpp_available():
        raise AbqError("--llama-cpp on needs llama-cpp-python: CMAKE_ARGS='-DGGML_NATIVE=ON' pip install "
                       "llama-cpp-python")
    from transformers import AutoTokenizer

    from abqllm.models.hub import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(s.model))
    ids = prompt_ids(tok, s.prompt_len)
    common = {"ids": ids, "new_tokens": s.new_tokens, "threads": s.threads, "runs": s.runs}
    # Every job is prepared first (checkpoints, GGUF variants); then each round runs every job once, so
    # slow drifts of a shared machine (neighbours' load, memory bandwidth) fall on all configurations alike.
    jobs = []
    for cfg in configs:
        quantize_s = 0.0
        path = {"float": s.model, "checkpoint": cfg.get("path")}.get(cfg["kind"])
        if cfg["kind"] == "rtn":
            path, quantize_s = _prepare_checkpoint(cfg, s, log)
        jobs.append(("abqllm", {**common, "model": path, "engine": s.engine, "kernel": s.kernel},
                     {"runtime": "abqllm", "config": cfg["name"], "engine": s.engine, "model_path": path,
                      "quantize_s": round(quantize_s, 2)}))
    if use_llama:
        for fmt, path in _gguf_variants(s, log):
            jobs.append(("llama_cpp", {**common, "gguf": path},
                         {"runtime": "llama.cpp", "config": fmt, "gguf": path, "tensor_types": _gguf_tensor_types(path)}))
    per_job: list[list[dict]] = [[] for _ in jobs]
    for rnd in range(s.rounds):
        for i, (kind, job, meta) in enumerate(jobs):
            who = meta["config"] if kind == "abqllm" else f"llama.cpp {meta['config']}"
            log(f"{who}: timing ({s.engine + ' engine, ' if kind == 'abqllm' else ''}{s.threads} threads"
                f"{f', round {rnd + 1}/{s.rounds}' if s.rounds > 1 else ''})")
            per_job[i].append(_spawn(kind, job))
            _log_row(log, {**meta, **per_job[i][-1]})
    rows = [{**meta, **_merge_rounds(results)} for (_, _, meta), results in zip(jobs, per_job)]
    return {
        "command": None, "model": s.model, "settings": asdict(s), "prompt_tokens": len(ids),
        "new_tokens": s.new_tokens, "threads": s.threads,
        "protocol": "batch 1, greedy, EOS ignored; one warm-up, medians of runs; decode tok/s = "
                    "(new_tokens - 1) one-token steps / their time; peak RSS per config in a fresh process"
                    + (f"; {s.rounds} interleaved rounds (every configuration once per round), median of the "
                       "rounds' medians" if s.rounds > 1 else ""),
        "llama_cpp": "ran" if use_llama else ("not installed" if s.llama_cpp == "auto" else "off"),
        "rows": rows, "machine": machine_info(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _merge_rounds(results: list[dict]) -> dict:
    """One round: its row as is. Several: medians over the rounds' medians, each round's figure kept in
    `<key>_rounds`; the per-run lists (`*_runs`) and other fields are the last successful round's."""
    ok = [r for r in results if "error" not in r]
    if len(results) == 1 or not ok:
        return results[0] if len(results) == 1 else {"error": results[0]["error"]}
    merged = dict(ok[-1])
    for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb", "end_rss_mb", "base_rss_mb", "load_s"):
        vals = [r[key] for r in ok if key in r]
        if vals:
            merged[key] = _median(vals)
            merged[f"{key}_rounds"] = vals
    merged["rounds_ok"] = len(ok)
    if len(ok) < len(results):
        merged["round_errors"] = [r["error"] for r in results if "error" in r]
    return merged


def _log_row(log, r: dict):
    if "error" in r:
        log(f"  {r['runtime']} {r['config']}: {r['error']}")
        return
    log(f"  {r['runtime']} {r['config']}: prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.1f} "
        f"tok/s, peak RSS {r['peak_rss_mb']:.0f} MB (after imports {r['base_rss_mb']:.0f} MB)")


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": list(os.getloadavg()),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def format_table(result: dict) -> str:
    head = ("| runtime | config | prefill tok/s | decode tok/s | peak RSS MB | RSS at end MB | RSS after imports MB |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['runtime']} | {r['config']} | error: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['runtime']} | {r['config']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r.get('end_rss_mb', float('nan')):.0f} | {r['base_rss_mb']:.0f} |")
    return "\n".join(lines)


def _worker_main(argv: list[str]) -> int:
    kind, job = argv[0], json.loads(argv[1])
    print(json.dumps(WORKERS[kind](job)), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m abqllm.runtime.bench worker KIND JOB_JSON (internal; use `abq bench cpu`)")
