// CUDA kernels of the RKLU loss: the CUDA implementations of the ops defined in rklu_cpu.cpp.
// Contract: docs/kernel-contract.md; math: rklu_math.h (the same formulas the CPU kernel runs).
//
// One block per row, two passes over the row in global memory: the statistics (online softmax, per thread, merged
// by warp shuffles and shared memory), then the gradient. Pass 1 loads with an L2 evict_last policy and pass 2 with
// evict_first (its reads are the row's last use), so that pass 2 mostly hits L2 instead of device memory; when no
// gradient is wanted there is one pass and no hint. Staging the row in shared memory instead (one block per SM) and
// splitting it over a thread-block cluster were measured slower on an H100: benchmarks/NOTES.md.
// Each thread handles 8 entries per step: one 16-byte load of bf16/fp16, two of fp32; all arithmetic in fp32.
// Ignored rows read nothing and write zeros. Everything runs on the current stream; nothing is read back to the host.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <torch/library.h>

#include <cstdint>

#include "rklu_checks.h"
#include "rklu_math.h"

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kPer = 8;  // entries per thread per step
constexpr unsigned kFull = 0xffffffffu;

enum Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// ------------------------------------------------------------------------------------------- loads and stores
__device__ __forceinline__ float bits_to_float(uint32_t h, int dtype) {  // h: one 16-bit value in the low half
  return dtype == kBF16 ? __uint_as_float(h << 16) : __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
}

__device__ __forceinline__ uint32_t float_to_bits(float x, int dtype) {
  return dtype == kBF16 ? __bfloat16_as_ushort(__float2bfloat16_rn(x)) : __half_as_ushort(__float2half_rn(x));
}

__device__ __forceinline__ float load1(const char* p, int dtype, int j) {
  if (dtype == kF32) return reinterpret_cast<const float*>(p)[j];
  return bits_to_float(reinterpret_cast<const unsigned short*>(p)[j], dtype);
}

// L2 policy of a 16-byte load: kKeep (evict_last: the row is read again), kLast (evict_first: its last read), or
// kPlain (no hint). Hints are PTX cache hints only: they change no value.
enum Policy : int { kPlain = 0, kKeep = 1, kLast = 2 };

// One 16-byte load under an L2 eviction policy (a PTX literal: evict_last or evict_first).
#define RKLU_LOAD16_L2(POLICY, u, p)                                                      \
  asm("{\n\t.reg .b64 pol;\n\t"                                                          \
      "createpolicy.fractional.L2::" POLICY ".b64 pol, 1.0;\n\t"                           \
      "ld.global.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], pol;\n\t}"                  \
      : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)                                      \
      : "l"(p))

template <int kPolicy>
__device__ __forceinline__ uint4 load16(const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kPolicy != kPlain) {
    uint4 u;
    if constexpr (kPolicy == kKeep) {
      RKLU_LOAD16_L2("evict_last", u, p);
    } else {
      RKLU_LOAD16_L2("evict_first", u, p);
    }
    return u;
  }
#endif
  return *reinterpret_cast<const uint4*>(p);
}

// Entries j..j+7 of a row (j a multiple of 8); entries past V read as −inf, which adds nothing to any sum.
// `vec`: the row start is 16-byte aligned, so whole groups use 16-byte loads.
template <int kPolicy = kPlain>
__device__ __forceinline__ void load8(const char* p, int dtype, int j, int V, bool vec, float (&x)[kPer]) {
  if (vec && j + kPer <= V) {
    if (dtype == kF32) {
      const uint4 ub = load16<kPolicy>(p + 4 * j), wb = load16<kPolicy>(p + 4 * j + 16);
      x[0] = __uint_as_float(ub.x); x[1] = __uint_as_float(ub.y); x[2] = __uint_as_float(ub.z);
      x[3] = __uint_as_float(ub.w); x[4] = __uint_as_float(wb.x); x[5] = __uint_as_float(wb.y);
      x[6] = __uint_as_float(wb.z); x[7] = __uint_as_float(wb.w);
    } else {
      const uint4 u = load16<kPolicy>(p + 2 * j);
      const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        x[2 * k] = bits_to_float(words[k] & 0xffffu, dtype);
        x[2 * k + 1] = bits_to_float(words[k] >> 16, dtype);
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPer; ++k) x[k] = j + k < V ? load1(p, dtype, j + k) : -rklu::kInf;
  }
}

__device__ __forceinline__ void store8(char* p, int dtype, int j, int V, bool vec, const float (&x)[kPer]) {
  if (vec && j + kPer <= V) {
    if (dtype == kF32) {
      reinterpret_cast<float4*>(p)[j / 4] = make_float4(x[0], x[1], x[2], x[3]);
      reinterpret_cast<float4*>(p)[j / 4 + 1] = make_float4(x[4], x[5], x[6], x[7]);
    } else {
      uint32_t words[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) words[k] = float_to_bits(x[2 * k], dtype) | (float_to_bits(x[2 * k + 1], dtype) << 16);
      reinterpret_cast<uint4*>(p)[j / 8] = make_uint4(words[0], words[1], words[2], words[3]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      if (j + k >= V) break;
      if (dtype == kF32) {
        reinterpret_cast<float*>(p)[j + k] = x[k];
      } else {
        reinterpret_cast<unsigned short*>(p)[j + k] = static_cast<unsigned short>(float_to_bits(x[k], dtype));
      }
    }
  }
}

__device__ __forceinline__ int elem_size(int dtype) { return dtype == kF32 ? 4 : 2; }

// ----------------------------------------------------------------------------------------------- reductions
__device__ __forceinline__ rklu::Stats warp_merge(rklu::Stats x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const rklu::Stats y{__shfl_xor_sync(kFull, x.m, off), __shfl_xor_sync(kFull, x.s, off),
                        __shfl_xor_sync(kFull, x.w, off)};
    x = rklu::merge(x, y);
  }
  return x;
}

// The merged statistics of the whole block, in every thread (fixed order: deterministic run to run).
__device__ __forceinline__ rklu::Stats block_merge(rklu::Stats x, rklu::Stats* shared /* [kWarps + 1] */) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  x = warp_merge(x);
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = warp_merge(lane < kWarps ? shared[lane] : rklu::stats_empty());
    if (lane == 0) shared[kWarps] = x;
  }
  __syncthreads();
  return shared[kWarps];
}

// --------------------------------------------------------------------------------------------------- kernels
struct FwdParams {
  const char* in[3];       // student, original, augmented (nullptr: the teacher is `original`)
  int64_t row_bytes[3];    // row strides in bytes
  int dtype[3];
  const int64_t* teacher_row;
  int64_t teacher_rows;    // M: teacher_row values must be < M (checked by a device assert)
  const float* grad_scale;
  float* loss;
  char* grad;              // [N, V] contiguous, the student's dtype; nullptr without compute_grad
  int V;
  float alpha, inv_t;
  bool reverse, vec;
};

// a = z/T and b = l_t/T for entries j..j+7.
template <int kPolicy>
__device__ __forceinline__ void scaled8(const char* const (&row)[3], const FwdParams& P, int j, float (&a)[kPer],
                                        float (&b)[kPer]) {
  load8<kPolicy>(row[0], P.dtype[0], j, P.V, P.vec, a);
  load8<kPolicy>(row[1], P.dtype[1], j, P.V, P.vec, b);
  if (row[2] != nullptr) {
    float g[kPer];
    load8<kPolicy>(row[2], P.dtype[2], j, P.V, P.vec, g);
#pragma unroll
    for (int k = 0; k < kPer; ++k) b[k] = rklu::teacher_logit(b[k], g[k], P.alpha);
  }
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    a[k] *= P.inv_t;
    b[k] *= P.inv_t;
  }
}

__global__ void __launch_bounds__(kThreads, 2) kl_fwd_kernel(const FwdParams P) {
  __shared__ rklu::Stats reduce_a[kWarps + 1], reduce_b[kWarps + 1];
  const int64_t row = blockIdx.x;
  const int V = P.V;
  const int64_t t = P.teacher_row[row];
  CUDA_KERNEL_ASSERT(t < P.teacher_rows);
  const int g_elem = elem_size(P.dtype[0]);
  char* grad_row = P.grad == nullptr ? nullptr : P.grad + row * V * g_elem;

  if (t < 0) {  // ignored row: no reads, zeros out
    if (threadIdx.x == 0) P.loss[row] = 0.f;
    if (grad_row != nullptr) {
      const float zero[kPer] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int j = threadIdx.x * kPer; j < V; j += kThreads * kPer) store8(grad_row, P.dtype[0], j, V, P.vec, zero);
    }
    return;
  }

  const char* rows[3] = {P.in[0] + row * P.row_bytes[0], P.in[1] + t * P.row_bytes[1],
                         P.in[2] == nullptr ? nullptr : P.in[2] + t * P.row_bytes[2]};
  // pass 1: per-thread online statistics, then the block merge
  rklu::Stats st_a = rklu::stats_empty(), st_b = rklu::stats_empty();
  for (int j = threadIdx.x * kPer; j < V; j += kThreads * kPer) {
    float a[kPer], b[kPer];
    if (grad_row != nullptr) {
      scaled8<kKeep>(rows, P, j, a, b);  // read again by pass 2: keep in L2
    } else {
      scaled8<kPlain>(rows, P, j, a, b);
    }
    float ma = a[0], mb = b[0];
#pragma unroll
    for (int k = 1; k < kPer; ++k) {
      ma = rklu::rk_max(ma, a[k]);
      mb = rklu::rk_max(mb, b[k]);
    }
    st_a = rklu::rebase(st_a, rklu::rk_max(st_a.m, ma));
    st_b = rklu::rebase(st_b, rklu::rk_max(st_b.m, mb));
    const float sh_a = rklu::safe_shift(st_a.m), sh_b = rklu::safe_shift(st_b.m);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const float ea = rklu::rk_exp(a[k] - sh_a), eb = rklu::rk_exp(b[k] - sh_b);
      st_a.s += ea;
      st_b.s += eb;
      if (P.reverse) {
        st_a.w += rklu::numerator_term(a[k], b[k], ea);
      } else {
        st_b.w += rklu::numerator_term(b[k], a[k], eb);
      }
    }
  }
  st_a = block_merge(st_a, reduce_a);
  st_b = block_merge(st_b, reduce_b);
  const rklu::RowResult r = rklu::finish_row(st_a, st_b, P.reverse);
  if (threadIdx.x == 0) P.loss[row] = r.kl;
  if (grad_row == nullptr) return;

  // pass 2: the gradient, times grad_scale/T
  const float coef = *P.grad_scale * P.inv_t;
  const bool nan_row = rklu::row_is_nan(r);
  for (int j = threadIdx.x * kPer; j < V; j += kThreads * kPer) {
    float a[kPer], b[kPer];
    scaled8<kLast>(rows, P, j, a, b);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      a[k] = nan_row  ? CUDART_NAN_F
             : P.reverse ? rklu::grad_reverse(a[k], b[k], r, coef)
                         : rklu::grad_forward(a[k], b[k], r, coef);
    }
    store8(grad_row, P.dtype[0], j, V, P.vec, a);
  }
}

__global__ void __launch_bounds__(256) kl_scale_grad_kernel(char* grad, int dtype, int V, bool vec, float* applied,
                                                           const float* grad_output_rows) {
  const int64_t row = blockIdx.x;
  const float g = grad_output_rows[row], done = applied[row];
  if (g == done) return;  // the usual case (g == 1): nothing to read or write
  const float factor = g / done;
  char* p = grad + row * V * elem_size(dtype);
  for (int j = threadIdx.x * kPer; j < V; j += blockDim.x * kPer) {
    float x[kPer];
    load8(p, dtype, j, V, vec, x);
#pragma unroll
    for (int k = 0; k < kPer; ++k) x[k] *= factor;
    store8(p, dtype, j, V, vec, x);
  }
  __syncthreads();  // every thread has read applied[row] before it changes
  if (threadIdx.x == 0) applied[row] = g;
}

// ------------------------------------------------------------------------------------------------- host side
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "rklu_fast: unsupported dtype ", t);
  }
}

bool aligned16(const void* p, int64_t row_bytes) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_bytes % 16 == 0;
}

void check_same_cuda(const at::Tensor& t, const at::Tensor& student, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == student.device(), "rklu_fast: ", name, " is on ", t.device(),
              ", student on ", student.device());
}

std::tuple<at::Tensor, at::Tensor> kl_fwd_cuda(const at::Tensor& student, const at::Tensor& original,
                                               const std::optional<at::Tensor>& augmented,
                                               const at::Tensor& teacher_row, const at::Tensor& grad_scale,
                                               double alpha, double inv_temperature, bool reverse, bool compute_grad) {
  rklu::check_fwd_args(student, original, augmented, teacher_row, grad_scale, inv_temperature);
  check_same_cuda(student, student, "student");
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t N = student.size(0), V = student.size(1);
  TORCH_CHECK(V < (int64_t{1} << 28), "rklu_fast: vocab ", rklu::num(V), " too large for the CUDA kernel");
  at::Tensor loss = at::empty({N}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({N, V}, student.options()) : at::empty({0}, student.options());
  if (N == 0) return {loss, grad};
  const at::Tensor rows = teacher_row.contiguous();
  const at::Tensor scale = grad_scale.contiguous();

  FwdParams P{};
  const at::Tensor* inputs[3] = {&student, &original, augmented.has_value() ? &*augmented : nullptr};
  bool vec = !compute_grad || (V * student.element_size()) % 16 == 0;  // grad rows (allocator-aligned base)
  for (int k = 0; k < 3; ++k) {
    if (inputs[k] == nullptr) continue;
    const at::Tensor& x = *inputs[k];
    P.in[k] = static_cast<const char*>(x.data_ptr());
    P.row_bytes[k] = x.stride(0) * x.element_size();
    P.dtype[k] = dtype_code(x.scalar_type());
    vec = vec && aligned16(P.in[k], P.row_bytes[k]);
  }
  P.teacher_row = rows.data_ptr<int64_t>();
  P.teacher_rows = original.size(0);
  P.grad_scale = scale.data_ptr<float>();
  P.loss = loss.data_ptr<float>();
  P.grad = compute_grad ? static_cast<char*>(grad.data_ptr()) : nullptr;
  P.V = static_cast<int>(V);
  P.alpha = static_cast<float>(alpha);
  P.inv_t = static_cast<float>(inv_temperature);
  P.reverse = reverse;
  P.vec = vec;
  kl_fwd_kernel<<<static_cast<unsigned>(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, grad};
}

void kl_scale_grad_cuda(at::Tensor& grad, at::Tensor& applied, const at::Tensor& grad_output_rows) {
  rklu::check_scale_args(grad, applied, grad_output_rows);
  check_same_cuda(grad, grad, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t N = grad.size(0), V = grad.size(1);
  if (N == 0) return;
  TORCH_CHECK(V < (int64_t{1} << 28), "rklu_fast: vocab ", rklu::num(V), " too large for the CUDA kernel");
  const bool vec = aligned16(grad.data_ptr(), V * grad.element_size());
  kl_scale_grad_kernel<<<static_cast<unsigned>(N), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<char*>(grad.data_ptr()), dtype_code(grad.scalar_type()), static_cast<int>(V), vec,
      applied.data_ptr<float>(), grad_output_rows.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(rklu_fast, CUDA, m) {
  m.impl("kl_fwd", &kl_fwd_cuda);
  m.impl("kl_scale_grad_", &kl_scale_grad_cuda);
}
