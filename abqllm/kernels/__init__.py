"""Kernel registry and the always-available reference implementations."""
from abqllm.kernels import reference  # noqa: F401  (registers the reference kernels)
# register 'cuda', 'cuda-gemv', 'triton', 'triton-kpacked' and 'triton-dense' (importing them imports neither
# triton nor nvcc)
from abqllm.kernels import cuda, cuda_gemv, dense_prefill, kpacked_linear, triton_linear  # noqa: F401
from abqllm.kernels import cpu  # noqa: F401  (registers 'cpu'; the C++ extension is built at first use)
from abqllm.kernels.registry import available, register, select  # noqa: F401
