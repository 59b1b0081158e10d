// PyTorch side of the csrc/ CUDA kernels: argument checks, output allocation, the current stream, and the
// bindings: a pybind11 module (through PyTorch's extension API) and torch.library operators, so that
// torch.compile can trace callers (their fake implementations are registered from Python, in
// edge_kernels/_cuda.py, once this library is loaded).
//
//   torch.ops.edge_kernels.logprob_entropy_fwd(x, targets, inv_temp, ignore_index, splits=0, softcap=0.0)
//       -> (logp, entropy, lse)    fp32 [N] each; all 0 on rows whose target is ignore_index (not read)
//   torch.ops.edge_kernels.logprob_entropy_bwd(x, targets, lse, entropy, grad_logp, grad_entropy,
//                                              inv_temp, out, splits=0, softcap=0.0) -> ()   writes dlogits into out
//
// x: [N, V] or [B, T, V] logits (fp32/fp16/bf16, unit stride over V, any row strides; N*V may exceed 2^31),
// targets: int64 [N] (N = B*T). splits = 0 picks the blocks per row; a benchmark may force it. softcap > 0
// soft-caps the logits as softcap * tanh(x / softcap) before the temperature; 0 = none.
//
// Only ATen/c10 core headers: the CPU PyTorch wheel lacks c10/cuda/impl/cuda_cmake_macros.h, included by every
// c10/cuda and ATen/cuda header. The current CUDA stream comes from c10's device-guard interface instead.

#include <cmath>
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <limits>
#include <optional>
#include <tuple>

#include "logprob_entropy.h"

// The operator namespace. Only the CPU CI's link-and-import test overrides it (-DEDGE_KERNELS_OPS_NS=...), so
// that its throwaway build can never collide with the real extension loaded in the same process.
#ifndef EDGE_KERNELS_OPS_NS
#define EDGE_KERNELS_OPS_NS edge_kernels
#endif
#define EDGE_KERNELS_STR2(x) #x
#define EDGE_KERNELS_STR(x) EDGE_KERNELS_STR2(x)

namespace edge_kernels {
namespace {

namespace ek = edge_kernels::cuda;

struct RowGeom {
  int64_t n;  // rows
  int64_t t;  // rows per batch entry (>= 1): row r is at (r / t) * stride_b + (r % t) * stride_t
  int64_t stride_b;
  int64_t stride_t;
  int64_t vocab;
};

RowGeom row_geometry(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "edge_kernels: ", name, " must be [N, V] or [B, T, V], got shape ",
              x.sizes());
  RowGeom g{};
  g.vocab = x.size(-1);
  TORCH_CHECK(g.vocab >= 1 && g.vocab <= (int64_t{1} << 30), "edge_kernels: the vocabulary size must be in [1, 2^30], got ",
              g.vocab);
  TORCH_CHECK(x.stride(-1) == 1 || g.vocab == 1, "edge_kernels: ", name,
              " must have unit stride over the vocabulary dim, got strides ", x.strides());
  if (x.dim() == 2) {
    g.n = x.size(0);
    g.t = std::max<int64_t>(g.n, 1);
    g.stride_b = 0;
    g.stride_t = x.stride(0);
  } else {
    g.n = x.size(0) * x.size(1);
    g.t = std::max<int64_t>(x.size(1), 1);
    g.stride_b = x.stride(0);
    g.stride_t = x.stride(1);
  }
  TORCH_CHECK(g.n <= std::numeric_limits<int32_t>::max(), "edge_kernels: at most 2^31 - 1 rows, got ", g.n);
  return g;
}

ek::DType logits_dtype(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "edge_kernels: ", name, " must be a CUDA tensor, got one on ", x.device());
  switch (x.scalar_type()) {
    case at::kFloat: return ek::DType::kFloat32;
    case at::kHalf: return ek::DType::kFloat16;
    case at::kBFloat16: return ek::DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "edge_kernels: ", name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
  return ek::DType::kFloat32;  // not reached
}

void check_rows(const at::Tensor& v, const char* name, int64_t n, const at::Device& device, at::ScalarType dt) {
  TORCH_CHECK(v.device() == device, "edge_kernels: ", name, " must be on ", device, ", got ", v.device());
  TORCH_CHECK(v.scalar_type() == dt, "edge_kernels: ", name, " must be ", dt, ", got ", v.scalar_type());
  TORCH_CHECK(v.numel() == n && v.is_contiguous(), "edge_kernels: ", name, " must be a contiguous tensor of ", n,
              " elements, got shape ", v.sizes(), " and strides ", v.strides());
}

void* current_stream(const at::Device& device) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
}

void check_inv_temp(double inv_temp) {
  TORCH_CHECK(inv_temp > 0.0 && std::isfinite(static_cast<float>(inv_temp)),
              "edge_kernels: inv_temp must be > 0 and finite in float32, got ", inv_temp);
}

void check_softcap(double softcap) {
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(static_cast<float>(softcap)) &&
                  (softcap == 0.0 || std::isfinite(1.0f / static_cast<float>(softcap))),
              "edge_kernels: softcap must be 0 (none) or > 0 and finite in float32, got ", softcap);
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "edge_kernels: launching ", what, " failed: ", ek::error_string(err));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_entropy_fwd_cuda(
    const at::Tensor& x, const at::Tensor& targets, double inv_temp, int64_t ignore_index, int64_t splits,
    double softcap) {
  const ek::DType dtype = logits_dtype(x, "logits");
  const RowGeom g = row_geometry(x, "logits");
  check_rows(targets, "targets", g.n, x.device(), at::kLong);
  check_inv_temp(inv_temp);
  check_softcap(softcap);

  const c10::DeviceGuard guard(x.device());
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({g.n}, opts);
  at::Tensor ent = at::empty({g.n}, opts);
  at::Tensor lse = at::empty({g.n}, opts);
  if (g.n == 0) return {logp, ent, lse};

  const ek::Plan plan = ek::plan_rows(g.n, g.vocab, dtype, ek::sm_count(x.device().index()), splits);
  at::Tensor workspace;
  ek::FwdParams p{};
  if (plan.splits > 1) {
    workspace = at::empty({3 * static_cast<int64_t>(plan.splits) * g.n}, opts);
    p.workspace = workspace.data_ptr<float>();
  }
  p.x = x.const_data_ptr();
  p.targets = targets.const_data_ptr<int64_t>();
  p.logp = logp.data_ptr<float>();
  p.entropy = ent.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.n = g.n;
  p.t = g.t;
  p.stride_b = g.stride_b;
  p.stride_t = g.stride_t;
  p.vocab = g.vocab;
  p.inv_temp = static_cast<float>(inv_temp);
  p.ignore_index = ignore_index;
  p.softcap = static_cast<float>(softcap);
  check_launch(ek::launch_fwd(p, dtype, plan, current_stream(x.device())), "the log-prob/entropy forward");
  return {logp, ent, lse};
}

void logprob_entropy_bwd_cuda(
    const at::Tensor& x, const at::Tensor& targets, const at::Tensor& lse,
    const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
    const std::optional<at::Tensor>& grad_entropy, double inv_temp, at::Tensor& out, int64_t splits,
    double softcap) {
  const ek::DType dtype = logits_dtype(x, "logits");
  const RowGeom g = row_geometry(x, "logits");
  TORCH_CHECK(out.device() == x.device(), "edge_kernels: out must be on ", x.device(), ", got ", out.device());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "edge_kernels: out must have the logits' dtype ",
              x.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(out.sizes() == x.sizes(), "edge_kernels: out must have the logits' shape ", x.sizes(), ", got ",
              out.sizes());
  const RowGeom go = row_geometry(out, "out");
  check_rows(targets, "targets", g.n, x.device(), at::kLong);
  check_rows(lse, "lse", g.n, x.device(), at::kFloat);
  check_rows(grad_logp, "grad_logp", g.n, x.device(), at::kFloat);
  const bool has_ge = grad_entropy.has_value() && grad_entropy->defined();
  if (has_ge) {
    check_rows(*grad_entropy, "grad_entropy", g.n, x.device(), at::kFloat);
    TORCH_CHECK(entropy.has_value() && entropy->defined(), "edge_kernels: grad_entropy needs entropy");
    check_rows(*entropy, "entropy", g.n, x.device(), at::kFloat);
  }
  check_inv_temp(inv_temp);
  check_softcap(softcap);
  if (g.n == 0) return;

  const c10::DeviceGuard guard(x.device());
  const ek::Plan plan = ek::plan_rows(g.n, g.vocab, dtype, ek::sm_count(x.device().index()), splits);
  ek::BwdParams p{};
  p.x = x.const_data_ptr();
  p.out = out.data_ptr();
  p.targets = targets.const_data_ptr<int64_t>();
  p.lse = lse.const_data_ptr<float>();
  p.entropy = has_ge ? entropy->const_data_ptr<float>() : nullptr;
  p.grad_logp = grad_logp.const_data_ptr<float>();
  p.grad_entropy = has_ge ? grad_entropy->const_data_ptr<float>() : nullptr;
  p.n = g.n;
  p.t = g.t;
  p.x_stride_b = g.stride_b;
  p.x_stride_t = g.stride_t;
  p.out_stride_b = go.stride_b;
  p.out_stride_t = go.stride_t;
  p.vocab = g.vocab;
  p.inv_temp = static_cast<float>(inv_temp);
  p.softcap = static_cast<float>(softcap);
  check_launch(ek::launch_bwd(p, dtype, plan, current_stream(x.device())), "the log-prob/entropy backward");
}

}  // namespace edge_kernels

TORCH_LIBRARY_FRAGMENT(EDGE_KERNELS_OPS_NS, m) {
  m.def(
      "logprob_entropy_fwd(Tensor x, Tensor targets, float inv_temp, int ignore_index, int splits=0,"
      " float softcap=0.0)"
      " -> (Tensor logp, Tensor entropy, Tensor lse)");
  m.def(
      "logprob_entropy_bwd(Tensor x, Tensor targets, Tensor lse, Tensor? entropy, Tensor grad_logp,"
      " Tensor? grad_entropy, float inv_temp, Tensor(a!) out, int splits=0, float softcap=0.0) -> ()");
}

TORCH_LIBRARY_IMPL(EDGE_KERNELS_OPS_NS, CUDA, m) {
  m.impl("logprob_entropy_fwd", &edge_kernels::logprob_entropy_fwd_cuda);
  m.impl("logprob_entropy_bwd", &edge_kernels::logprob_entropy_bwd_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "edge_kernels CUDA C++ kernels (csrc/); torch.ops." EDGE_KERNELS_STR(EDGE_KERNELS_OPS_NS)
            ".logprob_entropy_fwd/_bwd are the traceable entry points";
  m.def("logprob_entropy_fwd", &edge_kernels::logprob_entropy_fwd_cuda, "Forward: (logp, entropy, lse) per row",
        py::arg("x"), py::arg("targets"), py::arg("inv_temp"), py::arg("ignore_index"), py::arg("splits") = 0,
        py::arg("softcap") = 0.0);
  m.def("logprob_entropy_bwd", &edge_kernels::logprob_entropy_bwd_cuda, "Backward: writes dlogits into out",
        py::arg("x"), py::arg("targets"), py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"),
        py::arg("grad_entropy"), py::arg("inv_temp"), py::arg("out"), py::arg("splits") = 0,
        py::arg("softcap") = 0.0);
  m.def("plan_rows", [](int64_t n, int64_t vocab, int dtype, int sm_count, int64_t requested) {
          const auto plan = edge_kernels::cuda::plan_rows(n, vocab, static_cast<edge_kernels::cuda::DType>(dtype),
                                                          sm_count, requested);
          return std::make_tuple(plan.splits, plan.chunk);
        },
        "(splits, chunk) the kernels use for n rows of vocab columns (dtype 0 fp32, 1 fp16, 2 bf16)",
        py::arg("n"), py::arg("vocab"), py::arg("dtype"), py::arg("sm_count"), py::arg("requested") = 0);
  m.attr("OPS_NAMESPACE") = EDGE_KERNELS_STR(EDGE_KERNELS_OPS_NS);
}
