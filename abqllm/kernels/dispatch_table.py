"""Measured kernel choice for `auto` on a GPU: per-device tables derived from GPU suite runs.

`auto` takes the highest-priority kernel that supports a layer. On a GPU that has a table here
(abqllm/kernels/tables/*.json, matched by `torch.cuda.get_device_name`), it takes instead the kernel which that
device's suite run measured fastest for the layer's scheme class at that many input rows, as long as that kernel
supports the layer. A scheme class or device the table does not cover keeps the priority order.

A scheme class is (storage bits, activation bits, per channel or grouped): W2* (stored in 3 bits) shares W3's
kernels, and every group size counts as grouped (the suite measures g128). A rule covers the rows up to its `m_max`
and above the previous rule's; rows above the last rule take the last rule.

Shipped tables are written by benchmarks/gpu/derive_dispatch.py from a GPU suite run's results.json, and name that
run. `abq tune-kernels` (kernels/autotune.py) measures a model's own layers on the user's GPU and writes a table to
$ABQLLM_CACHE/tables (default ~/.cache/abqllm/tables), which comes before the shipped ones.
Environment: ABQLLM_DISPATCH_TABLE=off ignores the tables; ABQLLM_DISPATCH_TABLE=/path/table.json uses that file
for every GPU.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from abqllm.errors import AbqError

TABLES = Path(__file__).with_name("tables")
DEFAULT = "triton"  # what `auto` takes on CUDA without a table (the highest priority)
MARGIN = 0.03  # a rule leaves the default only for a larger gain, so that timing noise never flips it


@dataclass(frozen=True)
class Rule:
    storage_bits: int
    act_bits: int
    per_channel: bool
    m_max: int
    kernel: str


def scheme_class(layer) -> tuple[int, int, bool]:
    spec = layer.spec
    return spec.weight.storage_bits, spec.act.bits, spec.weight.group_size == 0


def parse(table: dict) -> dict[tuple[int, int, bool], list[Rule]]:
    """Rules by scheme class, sorted by m_max; refuses a malformed table."""
    out: dict[tuple[int, int, bool], list[Rule]] = {}
    for r in table.get("rules", []):
        rule = Rule(int(r["storage_bits"]), int(r["act_bits"]), bool(r["per_channel"]), int(r["m_max"]),
                    str(r["kernel"]))
        if rule.m_max < 1:
            raise ValueError(f"dispatch table rule {r}: m_max must be >= 1")
        out.setdefault((rule.storage_bits, rule.act_bits, rule.per_channel), []).append(rule)
    for rules in out.values():
        rules.sort(key=lambda r: r.m_max)
    return out


def derive_rules(times: dict, default: str = DEFAULT, margin: float = MARGIN) -> list[dict]:
    """Rules from timings: times[(scheme_class, m)][kernel][sample] = seconds (or us), a sample being one measured
    case of that class (a shape, a scheme). At each (class, m) a kernel competes only where it was timed on every
    sample the default was; the one with the lowest geometric mean wins, if it beats the default by more than
    `margin`. Each rule carries its evidence (geometric means, samples)."""
    rules = []
    for (cls, m) in sorted(times):
        by_kernel = times[(cls, m)]
        keys = set(by_kernel.get(default, {}))
        if not keys:
            continue
        score = {kern: math.exp(sum(math.log(t[key]) for key in keys) / len(keys))
                 for kern, t in by_kernel.items() if keys <= set(t)}
        best = min(score, key=score.get)
        pick = best if score[best] < (1 - margin) * score[default] else default
        rules.append(dict(storage_bits=cls[0], act_bits=cls[1], per_channel=cls[2], m_max=m, kernel=pick,
                          evidence=dict(geomean={k: round(v, 9 if v < 1 else 2) for k, v in sorted(score.items())},
                                        samples=sorted(" ".join(map(str, key)) for key in keys))))
    return rules


def lookup(rules: dict[tuple[int, int, bool], list[Rule]], cls: tuple[int, int, bool], rows: int) -> str | None:
    chain = rules.get(cls)
    if not chain:
        return None
    return next((r.kernel for r in chain if rows <= r.m_max), chain[-1].kernel)


def user_tables_dir() -> Path:
    root = os.environ.get("ABQLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "abqllm")
    return Path(root) / "tables"


def _load() -> list[tuple[str, dict]]:
    setting = os.environ.get("ABQLLM_DISPATCH_TABLE", "")
    if setting.lower() == "off":
        return []
    # a user's own tables (`abq tune-kernels`) come before the shipped ones: the first that names the GPU wins
    files = [Path(setting)] if setting else sorted(user_tables_dir().glob("*.json")) + sorted(TABLES.glob("*.json"))
    out = []
    for f in files:
        try:
            table = json.loads(f.read_text())
            out.append(("*" if setting else str(table["device"]), parse(table)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AbqError(f"cannot read the kernel dispatch table {f}: {type(e).__name__}: {e}. Delete it, write it "
                           "again (abq tune-kernels), or set ABQLLM_DISPATCH_TABLE=off") from None
    return out


# device index -> that device's rules (None: no table). Plain dicts, filled on first use outside tracing, so that the
# lookup under torch.compile is ordinary Python that dynamo can trace.
_BY_DEVICE: dict[int, dict | None] = {}


def reset() -> None:
    """Forget loaded tables (after changing ABQLLM_DISPATCH_TABLE or the files)."""
    _BY_DEVICE.clear()


def _rules_for(index: int) -> dict | None:
    if index not in _BY_DEVICE:
        name = torch.cuda.get_device_name(index)
        _BY_DEVICE[index] = next((rules for dev, rules in _load() if dev in ("*", name)), None)
    return _BY_DEVICE[index]


def choose(layer, device: torch.device, rows: int) -> str | None:
    """The measured-fastest kernel's name for this layer at `rows` input rows on `device`, or None."""
    if device.type != "cuda" or rows < 1:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _BY_DEVICE and torch.compiler.is_compiling():
        return None  # (not loaded yet: keep file and device queries out of the traced code)
    rules = _rules_for(index)
    return None if rules is None else lookup(rules, scheme_class(layer), rows)


def bitstream_needed(layer, device: torch.device) -> bool:
    """Whether `auto` may still need the layer's checkpoint bitstream on this GPU: True unless the GPU's table has
    rules for the layer's scheme class and every one of them names a kernel on the k-packed layout (or `triton` for
    single rows, which it serves with the k-packed GEMV)."""
    from abqllm.kernels import registry
    from abqllm.kernels.kpacked_linear import KP_MAX_M
    if device.type != "cuda":
        return True
    rules = _rules_for(device.index if device.index is not None else torch.cuda.current_device())
    chain = (rules or {}).get(scheme_class(layer))
    if not chain:
        return True
    for r in chain:
        try:
            kpacked = registry.layout("linear", r.kernel) == "kpacked"
        except KeyError:  # a kernel this installation does not have
            return True
        if not kpacked and not (r.kernel == DEFAULT and r.m_max <= KP_MAX_M):
            return True
    return False
