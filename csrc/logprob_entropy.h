// Interface between the CUDA kernels (logprob_entropy.cu) and the PyTorch glue (bindings.cpp).
//
// Deliberately free of PyTorch and CUDA headers: the .cu file compiles in seconds with nvcc alone (no ATen
// headers to parse once per GPU architecture), and the glue needs no CUDA toolkit headers. The glue never
// includes c10/cuda or ATen/cuda headers either: the CPU PyTorch wheel lacks c10/cuda/impl/cuda_cmake_macros.h,
// which all of them include, so CPU CI could not compile them.
#pragma once

#include <cstdint>

namespace edge_kernels {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Logits row r (of n) starts at element (r / t) * stride_b + (r % t) * stride_t; the vocabulary has unit stride.
struct FwdParams {
  const void* x;           // logits, dtype given separately
  const int64_t* targets;  // [n]
  float* logp;             // [n] out; 0 on ignored rows
  float* entropy;          // [n] out; 0 on ignored rows
  float* lse;              // [n] out; log-sum-exp of logits / T; 0 on ignored rows (their logits are not read)
  float* workspace;        // 3 * splits * n floats when plan.splits > 1, else unused
  int64_t n;
  int64_t t;
  int64_t stride_b;
  int64_t stride_t;
  int64_t vocab;
  float inv_temp;
  int64_t ignore_index;
  float softcap;           // c of c * tanh(x / c) applied to the logits before the temperature; 0: none
};

struct BwdParams {
  const void* x;
  void* out;                // dlogits, the logits' dtype; may equal x (in place)
  const int64_t* targets;
  const float* lse;
  const float* entropy;     // may be null when grad_entropy is null
  const float* grad_logp;   // 0 on ignored rows
  const float* grad_entropy;  // may be null
  int64_t n;
  int64_t t;
  int64_t x_stride_b;
  int64_t x_stride_t;
  int64_t out_stride_b;
  int64_t out_stride_t;
  int64_t vocab;
  float inv_temp;
  float softcap;            // as in FwdParams; 0: none
};

// Blocks per row (splits) and vocabulary columns per block (chunk). requested > 0 forces the split count.
struct Plan {
  int splits;
  int chunk;
};

Plan plan_rows(int64_t n, int64_t vocab, DType dtype, int sm_count, int64_t requested);

// Multiprocessors of a device (cached).
int sm_count(int device);

// Enqueue the kernels on stream (a cudaStream_t). Return 0 or the cudaError_t of the launch.
int launch_fwd(const FwdParams& p, DType dtype, const Plan& plan, void* stream);
int launch_bwd(const BwdParams& p, DType dtype, const Plan& plan, void* stream);
const char* error_string(int code);

}  // namespace cuda
}  // namespace edge_kernels
