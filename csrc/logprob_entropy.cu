// Logits in -> per-token log-prob of the target and full-vocabulary entropy: CUDA C++ kernels.
//
// The math is edge_kernels/reference.py's: z = x / T, streaming statistics per row m = max z,
// s = sum exp(z - m), b = sum exp(z - m) (z - m); lse = m + log s, H = log s - b / s; gradient
// dz_v = g_l (1[v = t] - p_v) - g_H p_v (log p_v + H), times 1/T for the raw logits. -inf logits are masked
// vocabulary entries (p = 0, no contribution); NaN or +inf logits give NaN.
//
// The op is memory-bound, so the kernels are built around the bytes:
//  * 16-byte vector loads (8 bf16/fp16 or 4 fp32 logits per thread and instruction), kUnroll of them in flight
//    per thread, streamed past L1; a scalar path covers the unaligned head and the tail of a row (any V, any
//    row stride) and rows whose input and output are misaligned relative to each other.
//  * Exponentials run in base 2 on the SFU (ex2.approx): y = x * (log2 e / T), s = sum 2^(y - shift),
//    b2 = sum 2^(y - shift) (y - shift), so that b = b2 ln 2; one FFMA + one MUFU per logit.
//  * Forward: one 256-thread block per (row, vocabulary chunk). With enough rows to fill the GPU a row is one
//    chunk and the block finishes the row itself; with few rows the row is split over several blocks that
//    write partial (max, s, b) and a second kernel merges them (O(splits * N) work). Rows whose target is
//    ignore_index are not read (logp = entropy = lse = 0): padding costs no bandwidth.
//  * Backward: same grid, no reduction; dlogits written with 16-byte streaming stores into `out`, which may
//    be the logits themselves (in place: every thread reads its 16 bytes before writing them). Rows whose
//    upstream gradients are both 0 (ignore_index) are written as zeros without reading the logits.
//  * Soft-cap (Gemma 2/3): with softcap > 0 every logit is first replaced by c * tanh(x / c) (fp32, -inf kept
//    as a masked entry) and the backward multiplies by 1 - tanh^2. It is a template flag (kCap), so the
//    kernels without it are the ones built before it existed.
//  * Offsets: row offsets are int64 (N * V may exceed 2^31); offsets inside a row are int (V < 2^31).
//
// This file needs nothing but the CUDA toolkit: the PyTorch glue (checks, allocation, stream) is in
// bindings.cpp, behind the plain interface of logprob_entropy.h.

#include "logprob_entropy.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

namespace edge_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;          // threads per block, forward and backward
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;             // 16-byte loads in flight per thread
constexpr int kMergeThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.69314718055994531f;
// exponents (base 2) below this give 0 in fp32 anyway; clamping keeps 0 * (-inf) = NaN out of the sums
constexpr float kMinExp2 = -256.f;

// ------------------------------------------------------------------------------------------------------
// device helpers

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// max that propagates NaN (fmaxf drops it): a NaN logit must poison its row, as in the reference.
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
#else
  return (a != a || b != b) ? __int_as_float(0x7fffffff) : fmaxf(a, b);
#endif
}

// Forward loads: read-only for the kernel's lifetime, touched once: non-coherent path, no L1 allocation.
__device__ __forceinline__ uint4 load16_ro(const uint4* p) {
  uint4 r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
#else
  r = __ldg(p);
#endif
  return r;
}

// 16 bytes of T <-> fp32. bf16 -> fp32 is a shift; stores round to nearest even like Tensor.to().
template <typename T>
struct Vec;

template <>
struct Vec<float> {
  static constexpr int N = 4;
  __device__ static __forceinline__ float load1(const float* p) { return *p; }
  __device__ static __forceinline__ void store1(float* p, float v) { *p = v; }
  __device__ static __forceinline__ void unpack(const uint4& r, float (&f)[N]) {
    f[0] = __uint_as_float(r.x);
    f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z);
    f[3] = __uint_as_float(r.w);
  }
  __device__ static __forceinline__ uint4 pack(const float (&f)[N]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

// The 16-bit types: 8 lanes, two per 32-bit word; Half2 supplies the per-word unpack2 / pack2.
template <typename Half2>
struct Vec16 {
  static constexpr int N = 8;
  __device__ static __forceinline__ void unpack(const uint4& r, float (&f)[N]) {
    Half2::unpack2(r.x, f[0], f[1]);
    Half2::unpack2(r.y, f[2], f[3]);
    Half2::unpack2(r.z, f[4], f[5]);
    Half2::unpack2(r.w, f[6], f[7]);
  }
  __device__ static __forceinline__ uint4 pack(const float (&f)[N]) {
    return make_uint4(Half2::pack2(f[0], f[1]), Half2::pack2(f[2], f[3]), Half2::pack2(f[4], f[5]),
                      Half2::pack2(f[6], f[7]));
  }
};

template <>
struct Vec<__nv_bfloat16> : Vec16<Vec<__nv_bfloat16>> {
  __device__ static __forceinline__ float load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
  __device__ static __forceinline__ void unpack2(uint32_t w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
  __device__ static __forceinline__ uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t w;
    memcpy(&w, &h, sizeof(w));
    return w;
  }
};

template <>
struct Vec<__half> : Vec16<Vec<__half>> {
  __device__ static __forceinline__ float load1(const __half* p) { return __half2float(*p); }
  __device__ static __forceinline__ void store1(__half* p, float v) { *p = __float2half_rn(v); }
  __device__ static __forceinline__ void unpack2(uint32_t w, float& lo, float& hi) {
    __half2 h;
    memcpy(&h, &w, sizeof(w));
    const float2 f = __half22float2(h);
    lo = f.x;
    hi = f.y;
  }
  __device__ static __forceinline__ uint32_t pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    uint32_t w;
    memcpy(&w, &h, sizeof(w));
    return w;
  }
};

// Elements before the first 16-byte boundary at p (p is T-aligned, as every tensor element is).
template <typename T>
__device__ __forceinline__ int head_elems(const T* p) {
  const unsigned mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(p)) & 15u;
  return static_cast<int>(((16u - mis) & 15u) / sizeof(T));
}

__device__ __forceinline__ int64_t row_offset(int64_t row, int64_t t, int64_t stride_b, int64_t stride_t) {
  return (row / t) * stride_b + (row % t) * stride_t;
}

// The soft-cap x -> c * tanh(x / c) of a raw logit (kCap = false: the identity, compiled away). -inf stays -inf
// (a masked vocabulary entry); its tanh is -1, so the chain-rule factor 1 - tanh^2 is 0 there.
template <bool kCap>
struct SoftCap {
  float c, inv_c;
  __device__ __forceinline__ float operator()(float x) const {
    if constexpr (kCap) {
      return x == -INFINITY ? x : c * tanhf(x * inv_c);
    } else {
      return x;
    }
  }
  // The capped logit, and d capped / d x in dcap.
  __device__ __forceinline__ float with_grad(float x, float& dcap) const {
    if constexpr (kCap) {
      const float th = tanhf(x * inv_c);
      dcap = fmaf(-th, th, 1.f);
      return x == -INFINITY ? x : c * th;
    } else {
      dcap = 1.f;
      return x;
    }
  }
};

template <bool kCap>
__host__ __device__ __forceinline__ SoftCap<kCap> make_softcap(float c) {
  return SoftCap<kCap>{c, kCap ? 1.f / c : 1.f};
}

// ------------------------------------------------------------------------------------------------------
// streaming softmax statistics, base 2

// Partial statistics of a set of logits, with c = log2(e) / T and shift = mx * c (0 while mx = -inf):
// s = sum 2^(x c - shift), b = sum 2^(x c - shift) (x c - shift).
struct Stats {
  float mx;  // max raw logit (-inf: nothing finite seen; NaN sticks)
  float s;
  float b;
};

__device__ __forceinline__ float shift_of(float mx, float c) { return mx == -INFINITY ? 0.f : mx * c; }

// Per-thread accumulator of the hot loop: Stats plus the cached -shift.
struct Acc {
  float mx, neg_shift, s, b;

  __device__ __forceinline__ void init() {
    mx = -INFINITY;
    neg_shift = 0.f;
    s = 0.f;
    b = 0.f;
  }

  // new_mx > mx, or NaN: rebase (s, b) onto the new shift.
  __device__ __forceinline__ void raise_max(float new_mx, float c) {
    const float new_shift = new_mx * c;
    if (s != 0.f) {  // s == 0: nothing to rebase (and 2^(0 - shift) could overflow)
      const float delta = -neg_shift - new_shift;  // <= 0
      const float a = fast_exp2(delta);
      b = a * fmaf(delta, s, b);
      s = a * s;
    }
    mx = new_mx;
    neg_shift = -new_shift;
  }

  template <int N>
  __device__ __forceinline__ void add(const float (&x)[N], float c) {
    float m = x[0];
#pragma unroll
    for (int k = 1; k < N; ++k) m = max_nan(m, x[k]);
    if (!(m <= mx)) raise_max(m, c);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      // d is not clamped before the exp: a NaN logit must reach s (fmaxf would drop it); -inf gives e = 0,
      // and only the factor of b is clamped so that 0 * -inf never forms
      const float d = fmaf(x[k], c, neg_shift);
      const float e = fast_exp2(d);
      s += e;
      b = fmaf(e, fmaxf(d, kMinExp2), b);
    }
  }
};

// Merge the statistics of two disjoint sets of logits.
__device__ __forceinline__ Stats combine(const Stats& p, const Stats& q, float c) {
  const float mx = max_nan(p.mx, q.mx);
  if (mx == -INFINITY) return p;  // neither side has a finite logit
  const float shift = mx * c;
  float s = 0.f, b = 0.f;
  if (p.s != 0.f) {
    const float d = shift_of(p.mx, c) - shift;
    const float a = fast_exp2(d);
    s = a * p.s;
    b = a * fmaf(d, p.s, p.b);
  }
  if (q.s != 0.f) {
    const float d = shift_of(q.mx, c) - shift;
    const float a = fast_exp2(d);
    s = fmaf(a, q.s, s);
    b = fmaf(a, fmaf(d, q.s, q.b), b);
  }
  return Stats{mx, s, b};
}

__device__ __forceinline__ Stats warp_reduce(Stats st, float c) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stats o;
    o.mx = __shfl_xor_sync(0xffffffffu, st.mx, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.b = __shfl_xor_sync(0xffffffffu, st.b, off);
    st = combine(st, o, c);
  }
  return st;
}

// Block-wide merge; the result is valid in thread 0.
__device__ __forceinline__ Stats block_reduce(Stats st, float c) {
  __shared__ Stats smem[kWarps];
  st = warp_reduce(st, c);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? smem[lane] : Stats{-INFINITY, 0.f, 0.f};
    st = warp_reduce(st, c);
  }
  return st;
}

// Fold x[0, len) into acc: scalar head up to the 16-byte boundary, kUnroll-deep vector body, scalar tail.
template <typename T, bool kCap>
__device__ __forceinline__ void accumulate_range(const T* p, int len, float c, const SoftCap<kCap>& cap, Acc& acc) {
  using V = Vec<T>;
  constexpr int kN = V::N;
  const int tid = threadIdx.x;
  const int head = min(head_elems(p), len);
  if (tid < head) {
    const float f[1] = {cap(V::load1(p + tid))};
    acc.add<1>(f, c);
  }
  const int nvec = (len - head) / kN;
  const uint4* pv = reinterpret_cast<const uint4*>(p + head);
  int i = tid;
  for (; i + (kUnroll - 1) * kThreads < nvec; i += kUnroll * kThreads) {
    uint4 r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) r[u] = load16_ro(pv + i + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float f[kN];
      V::unpack(r[u], f);
#pragma unroll
      for (int k = 0; k < kN; ++k) f[k] = cap(f[k]);
      acc.add<kN>(f, c);
    }
  }
  for (; i < nvec; i += kThreads) {
    float f[kN];
    V::unpack(load16_ro(pv + i), f);
#pragma unroll
    for (int k = 0; k < kN; ++k) f[k] = cap(f[k]);
    acc.add<kN>(f, c);
  }
  const int tail = head + nvec * kN;
  if (tid < len - tail) {
    const float f[1] = {cap(V::load1(p + tail + tid))};
    acc.add<1>(f, c);
  }
}

// ------------------------------------------------------------------------------------------------------
// forward

template <typename T>
struct FwdArgs {
  const T* x;
  const int64_t* tgt;
  float* logp;
  float* ent;
  float* lse;
  float* part;  // [3, splits, n] partial (mx, s, b) when splits > 1
  int64_t n;
  int64_t t;  // rows per batch entry: row r lives at (r / t) * stride_b + (r % t) * stride_t
  int64_t stride_b;
  int64_t stride_t;
  int vocab;
  int chunk;  // vocabulary columns per block
  int splits;
  float inv_temp;
  int64_t ignore_index;
  float softcap;  // used only by the kCap instantiations
};

// Outputs of a valid row (target != ignore_index) from its merged statistics.
template <typename T, bool kCap>
__device__ __forceinline__ void finalize_row(const FwdArgs<T>& a, int64_t row, int64_t tgt, const Stats& st) {
  const float log_s = logf(st.s);
  const float m = st.mx == -INFINITY ? 0.f : st.mx * a.inv_temp;
  const float lse = m + log_s;
  float logp;
  if (tgt >= 0 && tgt < a.vocab) {
    const T* xrow = a.x + row_offset(row, a.t, a.stride_b, a.stride_t);
    logp = make_softcap<kCap>(a.softcap)(Vec<T>::load1(xrow + tgt)) * a.inv_temp - lse;
  } else {
    logp = __int_as_float(0x7fffffff);  // the host validates targets; never read out of bounds
  }
  a.logp[row] = logp;
  a.ent[row] = log_s - (st.b * kLn2) / st.s;
  a.lse[row] = lse;
}

// Ignored rows are not read at all (padding can be a large part of an RL batch): logp = entropy = lse = 0.
template <typename T>
__device__ __forceinline__ void ignored_row(const FwdArgs<T>& a, int64_t row) {
  a.logp[row] = 0.f;
  a.ent[row] = 0.f;
  a.lse[row] = 0.f;
}

template <typename T, bool kFinal, bool kCap>
__global__ void __launch_bounds__(kThreads) logprob_entropy_fwd_kernel(const FwdArgs<T> a) {
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t tgt = a.tgt[row];
  if (tgt == a.ignore_index) {  // uniform over the block: every thread leaves before the block reduction
    if (kFinal && threadIdx.x == 0) ignored_row(a, row);
    return;  // with splits, the merge kernel writes the row
  }
  const float c = a.inv_temp * kLog2e;
  const int c0 = split * a.chunk;
  const int len = min(a.vocab - c0, a.chunk);
  const T* xrow = a.x + row_offset(row, a.t, a.stride_b, a.stride_t);

  Acc acc;
  acc.init();
  accumulate_range<T, kCap>(xrow + c0, len, c, make_softcap<kCap>(a.softcap), acc);
  const Stats st = block_reduce(Stats{acc.mx, acc.s, acc.b}, c);

  if (threadIdx.x == 0) {
    if constexpr (kFinal) {
      finalize_row<T, kCap>(a, row, tgt, st);
    } else {
      const int64_t plane = static_cast<int64_t>(a.splits) * a.n;
      const int64_t i = static_cast<int64_t>(split) * a.n + row;
      a.part[i] = st.mx;
      a.part[plane + i] = st.s;
      a.part[2 * plane + i] = st.b;
    }
  }
}

template <typename T, bool kCap>
__global__ void __launch_bounds__(kMergeThreads) logprob_entropy_merge_kernel(const FwdArgs<T> a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeThreads + threadIdx.x;
  if (row >= a.n) return;
  const int64_t tgt = a.tgt[row];
  if (tgt == a.ignore_index) {  // its partials were never written
    ignored_row(a, row);
    return;
  }
  const float c = a.inv_temp * kLog2e;
  const int64_t plane = static_cast<int64_t>(a.splits) * a.n;
  Stats st{-INFINITY, 0.f, 0.f};
  for (int sp = 0; sp < a.splits; ++sp) {
    const int64_t i = static_cast<int64_t>(sp) * a.n + row;
    st = combine(st, Stats{a.part[i], a.part[plane + i], a.part[2 * plane + i]}, c);
  }
  finalize_row<T, kCap>(a, row, tgt, st);
}

// ------------------------------------------------------------------------------------------------------
// backward

template <typename T>
struct BwdArgs {
  const T* x;
  T* out;  // may equal x (in place)
  const int64_t* tgt;
  const float* lse;
  const float* ent;     // may be null when g_ent is null
  const float* g_logp;  // 0 on ignored rows
  const float* g_ent;   // may be null
  int64_t n;
  int64_t t;
  int64_t x_stride_b;
  int64_t x_stride_t;
  int64_t o_stride_b;
  int64_t o_stride_t;
  int vocab;
  int chunk;
  float inv_temp;
  float softcap;  // used only by the kCap instantiation
};

// dz/T for one logit (without the target term): p (A + B t2), t2 = log2 p, with A = -(g_l + g_H H) / T and
// B = -g_H ln2 / T. t2 is clamped inside the bracket only: a -inf logit gives p = 0 and a 0 gradient.
struct GradCoef {
  float c, lse2, A, B;
  __device__ __forceinline__ float operator()(float x) const {
    const float t2 = fmaf(x, c, -lse2);
    const float p = fast_exp2(t2);
    return p * fmaf(B, fmaxf(t2, kMinExp2), A);
  }
};

template <typename T>
__device__ __forceinline__ void zero_range(T* op, int len) {
  using V = Vec<T>;
  constexpr int kN = V::N;
  const int tid = threadIdx.x;
  const int head = min(head_elems(op), len);
  if (tid < head) V::store1(op + tid, 0.f);
  const int nvec = (len - head) / kN;
  uint4* ov = reinterpret_cast<uint4*>(op + head);
  for (int i = tid; i < nvec; i += kThreads) __stcs(ov + i, make_uint4(0u, 0u, 0u, 0u));
  const int tail = head + nvec * kN;
  if (tid < len - tail) V::store1(op + tail + tid, 0.f);
}

// The gradient of one raw logit x: g at the capped logit, plus t_add on the target, times d capped / d x.
// Split in two (pre, then the target term, then post) so that the vector path adds the target term once.
template <bool kCap>
struct CappedGrad {
  GradCoef g;
  SoftCap<kCap> cap;
  __device__ __forceinline__ float pre(float x, float& dcap) const { return g(cap.with_grad(x, dcap)); }
  __device__ __forceinline__ float post(float r, float dcap) const {
    if constexpr (kCap) {
      return r * dcap;
    } else {
      return r;
    }
  }
};

template <typename T, bool kCap>
__global__ void __launch_bounds__(kThreads) logprob_entropy_bwd_kernel(const BwdArgs<T> a) {
  using V = Vec<T>;
  constexpr int kN = V::N;
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const int tid = threadIdx.x;
  const int c0 = split * a.chunk;
  const int len = min(a.vocab - c0, a.chunk);
  const T* xp = a.x + row_offset(row, a.t, a.x_stride_b, a.x_stride_t) + c0;
  T* op = a.out + row_offset(row, a.t, a.o_stride_b, a.o_stride_t) + c0;

  const float g_l = a.g_logp[row];
  const float g_h = a.g_ent != nullptr ? a.g_ent[row] : 0.f;
  if (g_l == 0.f && g_h == 0.f) {  // ignored row (or no upstream gradient): no need to read the logits
    zero_range<T>(op, len);
    return;
  }
  const float ent = g_h != 0.f ? a.ent[row] : 0.f;
  CappedGrad<kCap> g;
  g.g.c = a.inv_temp * kLog2e;
  g.g.lse2 = a.lse[row] * kLog2e;
  g.g.A = -a.inv_temp * fmaf(g_h, ent, g_l);
  g.g.B = -a.inv_temp * g_h * kLn2;
  g.cap = make_softcap<kCap>(a.softcap);
  const float t_add = a.inv_temp * g_l;
  const int64_t tgt = a.tgt[row];
  const int t_loc = (tgt >= c0 && tgt < static_cast<int64_t>(c0) + len) ? static_cast<int>(tgt - c0) : -1;

  const unsigned x_mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(xp)) & 15u;
  const unsigned o_mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(op)) & 15u;
  if (x_mis != o_mis) {
    // Input and output rows misaligned relative to each other (hence distinct memory): scalar but coalesced,
    // kUnroll loads issued before the stores (the compiler cannot reorder them itself: x and out may alias).
    int j = tid;
    for (; j + (kUnroll - 1) * kThreads < len; j += kUnroll * kThreads) {
      float v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = V::load1(xp + j + u * kThreads);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int k = j + u * kThreads;
        float d;
        float r = g.pre(v[u], d);
        if (k == t_loc) r += t_add;
        V::store1(op + k, g.post(r, d));
      }
    }
    for (; j < len; j += kThreads) {
      float d;
      float r = g.pre(V::load1(xp + j), d);
      if (j == t_loc) r += t_add;
      V::store1(op + j, g.post(r, d));
    }
    return;
  }

  const int head = min(head_elems(xp), len);
  if (tid < head) {
    float d;
    float v = g.pre(V::load1(xp + tid), d);
    if (tid == t_loc) v += t_add;
    V::store1(op + tid, g.post(v, d));
  }
  const int nvec = (len - head) / kN;
  const uint4* xv = reinterpret_cast<const uint4*>(xp + head);
  uint4* ov = reinterpret_cast<uint4*>(op + head);

  auto finish = [&](const uint4& r, int i) {
    float f[kN];
    float d[kN];
    V::unpack(r, f);
#pragma unroll
    for (int k = 0; k < kN; ++k) f[k] = g.pre(f[k], d[k]);
    const int e0 = head + i * kN;
    if (static_cast<unsigned>(t_loc - e0) < static_cast<unsigned>(kN)) {
#pragma unroll
      for (int k = 0; k < kN; ++k)
        if (e0 + k == t_loc) f[k] += t_add;
    }
#pragma unroll
    for (int k = 0; k < kN; ++k) f[k] = g.post(f[k], d[k]);
    __stcs(ov + i, V::pack(f));
  };

  int i = tid;
  for (; i + (kUnroll - 1) * kThreads < nvec; i += kUnroll * kThreads) {
    uint4 r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) r[u] = __ldcs(xv + i + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) finish(r[u], i + u * kThreads);
  }
  for (; i < nvec; i += kThreads) finish(__ldcs(xv + i), i);

  const int tail = head + nvec * kN;
  if (tid < len - tail) {
    const int j = tail + tid;
    float d;
    float v = g.pre(V::load1(xp + j), d);
    if (j == t_loc) v += t_add;
    V::store1(op + j, g.post(v, d));
  }
}

// ------------------------------------------------------------------------------------------------------
// host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int vec_width(DType dtype) { return dtype == DType::kFloat32 ? Vec<float>::N : Vec<__half>::N; }

template <typename T, bool kCap>
cudaError_t launch_fwd_t(const FwdParams& p, const Plan& plan, cudaStream_t stream) {
  FwdArgs<T> a{};
  a.x = static_cast<const T*>(p.x);
  a.tgt = p.targets;
  a.logp = p.logp;
  a.ent = p.entropy;
  a.lse = p.lse;
  a.part = p.workspace;
  a.n = p.n;
  a.t = p.t;
  a.stride_b = p.stride_b;
  a.stride_t = p.stride_t;
  a.vocab = static_cast<int>(p.vocab);
  a.chunk = plan.chunk;
  a.splits = plan.splits;
  a.inv_temp = p.inv_temp;
  a.ignore_index = p.ignore_index;
  a.softcap = p.softcap;
  const dim3 grid(static_cast<unsigned>(a.n), static_cast<unsigned>(a.splits));
  if (a.splits == 1) {
    logprob_entropy_fwd_kernel<T, true, kCap><<<grid, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
  logprob_entropy_fwd_kernel<T, false, kCap><<<grid, kThreads, 0, stream>>>(a);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>(ceil_div(a.n, kMergeThreads));
  logprob_entropy_merge_kernel<T, kCap><<<blocks, kMergeThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, bool kCap>
cudaError_t launch_bwd_t(const BwdParams& p, const Plan& plan, cudaStream_t stream) {
  BwdArgs<T> a{};
  a.x = static_cast<const T*>(p.x);
  a.out = static_cast<T*>(p.out);
  a.tgt = p.targets;
  a.lse = p.lse;
  a.ent = p.entropy;
  a.g_logp = p.grad_logp;
  a.g_ent = p.grad_entropy;
  a.n = p.n;
  a.t = p.t;
  a.x_stride_b = p.x_stride_b;
  a.x_stride_t = p.x_stride_t;
  a.o_stride_b = p.out_stride_b;
  a.o_stride_t = p.out_stride_t;
  a.vocab = static_cast<int>(p.vocab);
  a.chunk = plan.chunk;
  a.inv_temp = p.inv_temp;
  a.softcap = p.softcap;
  const dim3 grid(static_cast<unsigned>(a.n), static_cast<unsigned>(plan.splits));
  logprob_entropy_bwd_kernel<T, kCap><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

// The soft-cap picks the kernel instantiation (kCap), so the uncapped kernels carry no tanh.
template <typename T>
cudaError_t launch_fwd_cap(const FwdParams& p, const Plan& plan, cudaStream_t s) {
  return p.softcap > 0.f ? launch_fwd_t<T, true>(p, plan, s) : launch_fwd_t<T, false>(p, plan, s);
}

template <typename T>
cudaError_t launch_bwd_cap(const BwdParams& p, const Plan& plan, cudaStream_t s) {
  return p.softcap > 0.f ? launch_bwd_t<T, true>(p, plan, s) : launch_bwd_t<T, false>(p, plan, s);
}

}  // namespace

// With fewer rows than ~2 waves of blocks, rows are split (each block keeping at least one 16-byte vector per
// thread); chunks are multiples of the vector width so that aligned rows give aligned chunks.
Plan plan_rows(int64_t n, int64_t vocab, DType dtype, int sm_count, int64_t requested) {
  const int vec = vec_width(dtype);
  const int64_t most = std::min<int64_t>(65535, ceil_div(vocab, vec));
  int64_t splits;
  if (requested > 0) {
    splits = std::min(requested, most);
  } else {
    const int64_t target = static_cast<int64_t>(sm_count) * 16;  // 2 waves of 8 resident 256-thread blocks
    splits = n >= target ? 1
                         : std::min({ceil_div(target, std::max<int64_t>(n, 1)),
                                     std::max<int64_t>(1, vocab / (static_cast<int64_t>(kThreads) * vec)), most});
  }
  const int64_t chunk = ceil_div(ceil_div(vocab, splits), vec) * vec;
  return Plan{static_cast<int>(ceil_div(vocab, chunk)), static_cast<int>(chunk)};
}

int sm_count(int device) {
  static std::atomic<int> cache[128];
  if (device < 0 || device >= 128) device = 0;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    int count = 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) {
      (void)cudaGetLastError();
      count = 108;
    }
    cache[device].store(count, std::memory_order_relaxed);
    v = count;
  }
  return v;
}

int launch_fwd(const FwdParams& p, DType dtype, const Plan& plan, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return static_cast<int>(launch_fwd_cap<float>(p, plan, s));
    case DType::kFloat16: return static_cast<int>(launch_fwd_cap<__half>(p, plan, s));
    case DType::kBFloat16: return static_cast<int>(launch_fwd_cap<__nv_bfloat16>(p, plan, s));
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_bwd(const BwdParams& p, DType dtype, const Plan& plan, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return static_cast<int>(launch_bwd_cap<float>(p, plan, s));
    case DType::kFloat16: return static_cast<int>(launch_bwd_cap<__half>(p, plan, s));
    case DType::kBFloat16: return static_cast<int>(launch_bwd_cap<__nv_bfloat16>(p, plan, s));
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace edge_kernels
