// Host entry points of the logits-in log-prob/entropy CUDA kernels (csrc/logprob_entropy.cu).
//
// Shared by the pybind11 module and the torch.library registration in bindings.cpp. Only ATen/c10 core
// headers are used on purpose: the CPU PyTorch wheel lacks c10/cuda/impl/cuda_cmake_macros.h, so any
// c10/cuda or ATen/cuda header would stop these sources from compiling on CPU CI.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace edge_kernels {

// logits x: [N, V] or [B, T, V] (fp32/fp16/bf16, unit stride over V, any row strides), targets: int64 [N]
// with N = B*T. Returns fp32 [N] tensors (logp, entropy, lse); rows whose target equals ignore_index get
// logp = entropy = 0 (lse is still computed). splits > 0 forces the number of blocks per row (0 = auto).
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_entropy_fwd_cuda(
    const at::Tensor& x, const at::Tensor& targets, double inv_temp, int64_t ignore_index, int64_t splits);

// Writes d(loss)/d(logits) into out (shape of x, same dtype, unit stride over V; out may be x itself).
// lse, entropy, grad_logp, grad_entropy: fp32 [N]; grad_* already 0 on ignored rows. entropy is needed only
// when grad_entropy is given.
void logprob_entropy_bwd_cuda(
    const at::Tensor& x, const at::Tensor& targets, const at::Tensor& lse,
    const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
    const std::optional<at::Tensor>& grad_entropy, double inv_temp, at::Tensor& out, int64_t splits);

}  // namespace edge_kernels
