"""Inference runtimes: the lean CPU decode loop and the CPU benchmark harness."""
