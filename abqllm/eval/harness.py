"""lm-evaluation-harness tasks on an abqllm model (float or quantized), through lm-eval's own model class.

The loaded model goes to lm-eval as a model instance wrapped in its `HFLM` (the interface lm-eval
documents for pre-initialized models), so batching, few-shot contexts, metrics and aggregation are
lm-eval's. Quantized checkpoints pass through HFLM unchanged: their QuantLinear layers are ordinary
modules of the model, and the `quantization_config` HFLM hands to transformers' AutoQuantizationConfig
is one transformers knows once abqllm is imported (abqllm/integrations registers it). Tasks are looked up by lm-eval's TaskManager over its own task folder plus
ours (abqllm/eval/tasks: abq_lastword, abq_nextsent, built from the held-apart evaluation text).
Standard tasks (hellaswag, arc_easy, ...) need their datasets from the Hugging Face hub.
"""

from __future__ import annotations

import contextlib
import logging
import time

from abqllm.errors import AbqError
from abqllm.eval.tasks import LOCAL_TASKS, TASKS_DIR

INSTALL = "pip install 'abqllm[eval]' (or pip install lm-eval)"
LIST_HINT = "`abq eval --model M --tasks list` prints the available tasks"


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError:
        raise AbqError(f"abq eval --tasks needs lm-evaluation-harness: {INSTALL}") from None
    return lm_eval


def task_manager(names: list[str] | None = None):
    """lm-eval's TaskManager over abqllm's local tasks and, unless `names` are all local, lm-eval's own.

    Indexing lm-eval's thousands of task files takes seconds to half a minute: skipped when not needed.
    """
    local_only = names is not None and all(n in LOCAL_TASKS for n in names)
    return _lm_eval().tasks.TaskManager(include_path=str(TASKS_DIR), include_defaults=not local_only)


def available_tasks() -> list[str]:
    """Every task, group and tag name: abqllm's local tasks first, then lm-eval's."""
    names = task_manager().all_tasks
    return list(LOCAL_TASKS) + [n for n in names if n not in LOCAL_TASKS]


def resolve_tasks(names: list[str], manager) -> list[str]:
    """Check task names (glob patterns allowed) before any model is loaded; unknown ones are one error."""
    out, unknown = [], []
    for name in names:
        if name in manager.all_tasks:
            out.append(name)
        elif any(c in name for c in "*?[") and (matched := manager.match_tasks([name])):
            out.extend(matched)
        else:
            unknown.append(name)
    if unknown:
        raise AbqError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; {LIST_HINT} "
                       f"(local, no hub needed: {', '.join(LOCAL_TASKS)})")
    if not out:
        raise AbqError(f"no tasks given; {LIST_HINT}")
    return list(dict.fromkeys(out))


def _top_level(loaded: dict) -> list:
    """The requested tasks and groups as TaskManager.load built them (groups keep their aggregation)."""
    groups, group_map = loaded.get("groups", {}), loaded.get("group_map", {})
    children = {c for cs in group_map.values() for c in cs}
    in_group = {t.task_name for g in groups.values() for t in g.get_all_tasks()}
    return ([g for name, g in groups.items() if name not in children]
            + [t for name, t in loaded["tasks"].items() if name not in in_group])


def load_tasks(names: list[str], manager) -> list:
    """Build the tasks, which downloads or reads their documents: failures become one AbqError."""
    try:
        return _top_level(manager.load(names))
    except AbqError:
        raise
    except Exception as e:  # hub, network, cache or dataset-format errors all mean the same to the user
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise AbqError(f"could not load the documents of task(s) {', '.join(names)} ({type(e).__name__}: {first}); "
                       f"standard lm-eval tasks need the Hugging Face hub; the local tasks "
                       f"({', '.join(LOCAL_TASKS)}) do not") from None


def run_tasks(model, tokenizer, tasks: list, limit: int | float | None = None, num_fewshot: int | None = None,
              batch_size: int = 1, seed: int = 1234, manager=None) -> dict:
    """Evaluate `model` on lm-eval `tasks` (names, or Task/Group objects from load_tasks).

    Returns {"results": {task: {metric: value, metric_stderr: value}}, "n_samples": {task: n},
    "versions", "num_fewshot", "limit", "seconds", "lm_eval_version"}.
    """
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    if tasks and isinstance(tasks[0], str):
        manager = manager or task_manager(tasks)
        tasks = load_tasks(resolve_tasks(tasks, manager), manager)
    t0 = time.perf_counter()
    with _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        raw = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager or task_manager(), random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      log_samples=False, bootstrap_iters=1000)
    seconds = time.perf_counter() - t0
    results = {}
    for task, metrics in raw["results"].items():
        row = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            row[metric if filt in ("", "none") else f"{metric},{filt}"] = value
        results[task] = row
    n_samples = {t: n.get("effective") for t, n in raw.get("n-samples", {}).items()}
    return {"results": results, "n_samples": n_samples, "versions": raw.get("versions", {}),
            "num_fewshot": raw.get("n-shot", {}), "limit": limit, "seconds": round(seconds, 1),
            "lm_eval_version": getattr(lm_eval, "__version__", None)}


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs its own warnings (a model instance ignores device arguments, --limit is for testing,
    custom datasets take --metadata ...), which say nothing to an `abq eval` user: errors only, unless
    abqllm logs at debug level (`abq -v`)."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    if not logging.getLogger("abqllm").isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def format_table(res: dict) -> str:
    """One line per task and metric: value ± stderr."""
    def num(v):
        return "-" if not isinstance(v, (int, float)) else f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"

    lines = [f"{'task':<22}{'metric':<14}{'value':>12}{'± stderr':>12}{'n':>7}"]
    for task, metrics in res["results"].items():
        for metric, value in metrics.items():
            if "_stderr" in metric:
                continue
            lines.append(f"{task:<22}{metric:<14}{num(value):>12}{num(metrics.get(f'{metric}_stderr')):>12}"
                         f"{res['n_samples'].get(task) or '-':>7}")
    return "\n".join(lines)
