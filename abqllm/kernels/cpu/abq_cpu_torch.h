// What the torch binding (abq_cpu_ops.cpp) shares with the native decode step (abq_cpu_decode.cpp).
#pragma once

#include <torch/extension.h>

#include <optional>

namespace abqcpu_torch {

// The packed linear op (see abq_cpu_ops.cpp): y [M, N] = Q_a(x [M, K]) @ (s_w (w - z_w))^T + bias.
at::Tensor& linear_out(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& zeros, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& act_scale, const std::optional<at::Tensor>& act_zero,
                       const std::optional<at::Tensor>& row_offsets, int64_t in_features, int64_t storage_bits,
                       int64_t group_size, int64_t act_bits, bool act_symmetric, int64_t isa_arg, int64_t mm_from_m,
                       at::Tensor& y);

// Adds the native decoder class to the extension's Python module.
void bind_decoder(pybind11::module& m);

}  // namespace abqcpu_torch
