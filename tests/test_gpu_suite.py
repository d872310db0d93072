"""The GPU suite's plumbing, without a GPU: block order, which kernels it checks and times, weights shared across
activation schemes, the e2e plan and the targets tables (on hand-made rows, not measurements), and the whole
script end to end in its CPU dry run (tiny shapes in Triton's interpreter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from abqllm.kernels import kpacked_linear as KL
from abqllm.kernels.reference import linear_reference
from abqllm.spec import ActSpec, parse_scheme
from benchmarks import gpu_suite as GS
from benchmarks.gpu import llama
from benchmarks.gpu import suite_kernels as SK
from benchmarks.gpu import suite_plan as SP
from benchmarks.gpu import suite_report as SR

ROOT = Path(__file__).resolve().parents[1]


def test_blocks_put_the_targets_first_and_cover_the_grid_once():
    blocks = SP.kernel_blocks(SP.SHAPES, SP.MS)
    assert blocks[0] == (8192, 8192, 1)
    assert blocks[1:5] == [(n, k, 2048) for n, k in SP.SHAPES]
    assert sorted(blocks) == sorted({(n, k, m) for n, k in SP.SHAPES for m in SP.MS})
    assert len(blocks) == len(SP.SHAPES) * len(SP.MS)


def test_every_timed_kernel_is_also_checked():
    """A timed row's kernel runs a launcher that the correctness section checks on its own."""
    checked = {c.name for c in SK.CHECKED}
    runs = {"triton": {"kp_gemv", "qlinear_kernel", "dense"}, "cuda-gemv": {"cuda-gemv"},
            "triton-kpacked": {"kp_gemm"}, "triton-dense": {"dense"}, "cuda-bmma": {"cuda-bmma"}}
    assert set(runs) == set(SK.OURS)
    for name in SK.OURS:
        assert runs[name] <= checked


def test_timed_kernels_by_m_on_the_cpu():
    layer = llama.random_quant_linear(64, 32, parse_scheme("W4A8g32").layer, "cpu")
    cpu = torch.device("cpu")
    names = lambda m, a: {t.name for t in SK.timed_for(m, a, layer, cpu)}  # noqa: E731
    gemv = {"cuda-gemv"} if SK.CU.find_nvcc() else set()  # emulated on the CPU when nvcc built it
    assert names(1, 8) == {"triton"} | gemv
    assert names(16, 8) == {"triton", "triton-kpacked"}
    assert names(2048, 8) == {"triton", "triton-dense"}
    assert "cuda-bmma" not in names(16, 8)  # bit planes need a GPU


def test_with_act_shares_the_weights_and_computes_the_other_scheme():
    layer = llama.random_quant_linear(96, 24, parse_scheme("W4A16g32").layer, "cpu", seed=1)
    KL.layer_kpacked(layer)
    twin = llama.with_act(layer, ActSpec(8))
    assert twin.qweight is layer.qweight and twin.scales is layer.scales and twin.zeros is layer.zeros
    assert twin._kernel_cache is layer._kernel_cache and KL.layer_kpacked(twin) is KL.layer_kpacked(layer)
    assert twin.spec.act.bits == 8 and layer.spec.act.bits == 16
    x = torch.randn(3, 96).half()
    fresh = llama.random_quant_linear(96, 24, parse_scheme("W4A8g32").layer, "cpu", seed=1)
    assert torch.equal(linear_reference(twin, x.double()), linear_reference(fresh, x.double()))


def test_e2e_plan_runs_batch_one_first_and_each_variant_once():
    args = GS.parse_args(["--out", "/tmp/x"])
    plan = SP.e2e_plan(args, cuda=True)
    assert plan[0] == (1, "fp16")
    firsts16 = plan.index((16, "fp16"))
    assert all(b == 1 for b, _ in plan[:firsts16])
    assert {(1, f"{v}/cuda") for v in SP.E2E_CUDA} <= set(plan[:firsts16])
    assert len(plan) == len(set(plan))
    for _, v in plan:
        scheme, _, mode = v.partition("/")
        assert mode in ("", "cuda", "kpacked") and (scheme == "fp16" or parse_scheme(scheme))


def _row(variant, vs, mem):
    return dict(variant=variant, batch=1, tokens_per_s=100.0 * vs, vs_fp16=vs, memory_over_weights_kv=mem)


def test_e2e_targets_need_speed_and_memory_together():
    rows = [_row("fp16", 1.0, 1.03), _row("W4A16", 2.7, 1.6), _row("W4A16/cuda", 2.6, 1.04),
            _row("W2A8/cuda", 3.0, 1.05), _row("W8A8", 1.5, 1.08)]
    text = "\n".join(SR._render_e2e_targets(rows))
    assert "| W4A16 | 2.7 (>= 2.5x) | 1.6 | no |" in text  # fast, but the weights are held twice
    assert "| W4A16/cuda | 2.6 (>= 2.5x) | 1.04 | yes |" in text
    assert "| W2A8/cuda | 3.0 (>= 3.5x) | 1.05 | no |" in text
    assert "| W8A8 | 1.5 | 1.08 | (memory) yes |" in text


def test_kernel_targets_take_our_best_row():
    rows = [dict(kernel="torch float16", scheme="W16A16", m=1, n=8192, k=8192, us=40.0),
            dict(kernel="triton", scheme="W4A16", m=1, n=8192, k=8192, us=20.0),
            dict(kernel="cuda-gemv", scheme="W4A16", m=1, n=8192, k=8192, us=15.0)]
    rows += [dict(kernel="torch _int_mm", scheme="W8A8 (int8 GEMM only)", m=2048, n=n, k=k, us=100.0)
             for n, k in SP.SHAPES]
    rows += [dict(kernel="triton", scheme="W8A8", m=2048, n=n, k=k, us=200.0) for n, k in SP.SHAPES]
    rows += [dict(kernel="triton-dense", scheme="W8A8 pc", m=2048, n=n, k=k, us=110.0) for n, k in SP.SHAPES]
    text = "\n".join(SR._render_targets(rows))
    assert "| M=1, 8192^2: W4A16 >= 2.5x fp16 | 8192x8192: 2.67x (cuda-gemv) | yes |" in text
    assert "| M=1, 8192^2: W8A8 >= 1.8x fp16 | not measured | - |" in text
    assert "8192x8192: 0.91x (triton-dense, pc)" in text  # the per-channel row is the best, and says so
    assert "| M=2048: W8A8 >= 0.8x _int_mm | " in text and "| M=2048: W4A8 >= 0.8x _int_mm | not measured | - |" in text


def test_the_gpu_call_runs_end_to_end_on_the_cpu(tmp_path):
    """`bash benchmarks/gpu_suite.sh --cpu`: the very call a GPU session makes, every step on tiny shapes in the
    interpreter (about 75 s; in the default run because a GPU session is rare and short, and a script that breaks
    there wastes it). Every step writes its sections, the report renders, the dispatch table is derived."""
    env = {**os.environ, "OUT": str(tmp_path), "DEADLINE": "400", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--cpu"], capture_output=True,
                          text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("warm", "check", "kernels", "e2e"):
        assert f"step {step}: exit 0" in proc.stdout, proc.stdout[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["correctness"]["passed"] == data["correctness"]["total"] > 0
    assert {r["kernel"] for r in data["correctness"]["rows"]} >= {"qlinear_kernel", "kp_gemv", "kp_gemm", "dense"}
    assert any(r.get("kernel") == "triton" and "us" in r for r in data["kernels"]["rows"])
    assert all("tokens_per_s" in r for r in data["e2e"]["rows"])
    assert "## Targets (issue 4)" in (tmp_path / "results.md").read_text()
    table = json.loads((tmp_path / "dispatch_table.json").read_text())  # (CPU timings: the rules mean nothing)
    assert table["rules"] and all(r["kernel"] in SK.OURS for r in table["rules"])


def test_warmup_covers_every_step_once_and_keeps_families_together():
    args = GS.parse_args(["--out", "/tmp/x"])
    items = SP.warmup_items(args, cuda=True)
    assert len(items) == len(set(items))
    whats = {it[9] for it in items}
    assert {"timed", "checked"} <= whats and {label for _, label, _ in SP.sweep_plan(args)} <= whats
    grid = {(it[1], it[2], it[0]) for it in items if it[9] == "timed"}
    assert set(SP.kernel_blocks(SP.SHAPES, SP.MS)) <= grid  # every timed block is compiled ahead
    chunks = SP.warmup_chunks(items, 12, args, cuda=True)
    assert sorted(x for c in chunks for x in c) == sorted(items)
    owner = {}
    for i, c in enumerate(chunks):
        for it in c:
            assert owner.setdefault((it[4] + it[5], it[6], it[8]), i) == i  # a family stays in one worker
        first_timed = next(j for j, it in enumerate(c) if it[9] not in ("checked",))
        assert all(it[9] == "checked" for it in c[:first_timed])  # the checks come first
