"""benchmarks/gpu/kp_report.py renders a kp_check.py JSON against issue 4's targets. The input here is a
hand-made JSON shaped like kp_check's (not a measurement): it checks the report's arithmetic and verdicts."""
from benchmarks.gpu import kp_report


def fake_run():
    timings = [dict(kernel="torch fp16", n=8192, k=8192, us=40.0),
               dict(kernel="kp_gemv", scheme="W4A16", n=8192, k=8192, us=25.0),
               dict(kernel="cuda_gemv", scheme="W4A16", n=8192, k=8192, us=15.0),  # 2.67x: met
               dict(kernel="gemlite W4A16", scheme="W4A16", n=8192, k=8192, us=30.0),
               dict(kernel="cuda_gemv", scheme="W2A8", n=8192, k=8192, us=20.0)]  # 2.0x: missed
    large = [dict(m=2048, n=8192, k=8192, fp16_us=400.0, int_mm_us=300.0,
                  **{"W4A16 dense_us": 500.0, "W4A16 kp_gemm_us": 900.0, "W8A8/pc dense_us": 360.0})]
    e2e = [dict(variant="fp16", tokens_per_s=100.0, peak_bytes=15e9, weight_bytes=13e9, kv_bytes=1e9),
           dict(variant="W4A16", tokens_per_s=200.0, peak_bytes=5e9, weight_bytes=4e9, kv_bytes=1e9),
           dict(variant="W4A16/cuda", tokens_per_s=260.0, peak_bytes=5e9, weight_bytes=4e9, kv_bytes=1e9)]
    return dict(gpu="test", timings=timings, large_m=large, e2e=e2e, correctness=[dict(ok=True)], ceilings={})


def test_targets_and_verdicts():
    text = kp_report.report(fake_run())
    assert "| M = 1, 8192^2: W4A16 >= 2.5x fp16 | 2.67x (cuda_gemv; 2.00x the best peer) | met |" in text
    assert "| M = 1, 8192^2: W2A8 >= 3.5x fp16 | 2.00x (cuda_gemv) | missed (57%) |" in text
    assert "| M = 1, 8192^2: W2A16 >= 3.5x fp16 | - | not measured |" in text
    assert "| M = 2048, 8192^2: W4A16 >= 0.7x fp16 | 0.80x (dense) | met |" in text
    assert "| M = 2048, 8192^2: W8A8 per channel >= 0.8x _int_mm | 0.83x (dense) | met |" in text
    assert "| end to end, batch 1: W4A16 >= 2.5x fp16 | 2.60x (best of its variants) | met |" in text
    assert "| end to end, batch 1: W2A8 >= 3.5x fp16 | - (best of its variants) | not measured |" in text
    assert "| end to end memory: W4A16 peak <= 1.1 (weights + KV) | 1.000 (best of its variants) | met |" in text


def test_empty_run_says_not_measured():
    text = kp_report.report(dict(gpu="test"))
    assert text.count("not measured") == len(kp_report.M1_TARGETS) + len(kp_report.LARGE_TARGETS) + 2 * len(
        kp_report.E2E_TARGETS)
