// CUDA kernels of the RKLU loss: the CUDA implementations of the ops defined in rklu_cpu.cpp.
// Contract: docs/kernel-contract.md; math: rklu_math.h (the same formulas the CPU kernel runs).
//
// Two forward kernels, chosen per call (`RKLU_CUDA_KERNEL=auto|cluster|rowwise` forces one, for tests and tuning):
//
// * cluster (Hopper, sm_90+): a row is split into C contiguous slices (C = 1, 2, 4 or 8, the smallest whose slice of
//   the three rows fits in ~64 KB of shared memory), one CTA per slice, the C CTAs of a row forming a thread-block
//   cluster. Each CTA copies its slice into shared memory with cp.async (16-byte copies, all in flight at once),
//   computes its slice's statistics, and the cluster exchanges the C partial statistics through distributed shared
//   memory (merged in rank order in every CTA: deterministic). The gradient pass then reads shared memory, so device
//   memory sees each input byte once and each gradient byte once: the byte floor. Several small CTAs per SM let one
//   CTA's copies overlap another's arithmetic.
// * rowwise (any GPU; unaligned rows; slices too large): one 512-thread block per row, two passes over global
//   memory (statistics, then gradient; the second read partly hits L2).
//
// Each thread handles 8 entries per step: one 16-byte load of bf16/fp16, two of fp32; all arithmetic in fp32.
// Ignored rows read nothing and write zeros. Everything runs on the current stream; nothing is read back to the host.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <cstring>

#include "rklu_checks.h"
#include "rklu_math.h"

namespace {

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

// Entries j..j+7 of a row (j a multiple of 8); entries past V read as −inf, which adds nothing to any sum.
// `vec`: the row start is 16-byte aligned, so whole groups use 16-byte loads.
__device__ __forceinline__ void load8(const char* p, int dtype, int j, int V, bool vec, float (&x)[kPer]) {
  if (vec && j + kPer <= V) {
    if (dtype == kF32) {
      const float4 u = reinterpret_cast<const float4*>(p)[j / 4];
      const float4 w = reinterpret_cast<const float4*>(p)[j / 4 + 1];
      x[0] = u.x; x[1] = u.y; x[2] = u.z; x[3] = u.w;
      x[4] = w.x; x[5] = w.y; x[6] = w.z; x[7] = w.w;
    } else {
      const uint4 u = reinterpret_cast<const uint4*>(p)[j / 8];
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
template <int kThreads>
__device__ __forceinline__ rklu::Stats block_merge(rklu::Stats x, rklu::Stats* shared /* [kThreads / 32 + 1] */) {
  constexpr int kWarps = kThreads / 32;
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
  int smem_offset[3];      // cluster kernel: where each input's slice starts in shared memory
  const int64_t* teacher_row;
  int64_t teacher_rows;    // M: teacher_row values must be < M (checked by a device assert)
  const float* grad_scale;
  float* loss;
  char* grad;              // [N, V] contiguous, the student's dtype; nullptr without compute_grad
  int V;
  int slice;               // cluster kernel: entries per CTA (a multiple of kPer)
  int slice_bytes;         // cluster kernel: one buffer's bytes (every input's slice)
  float alpha, inv_t;
  bool reverse, vec;
};

// a = z/T and b = l_t/T for entries j..j+7 of rows of `len` entries.
__device__ __forceinline__ void scaled8(const char* const (&row)[3], const FwdParams& P, int j, int len,
                                        float (&a)[kPer], float (&b)[kPer]) {
  load8(row[0], P.dtype[0], j, len, P.vec, a);
  load8(row[1], P.dtype[1], j, len, P.vec, b);
  if (row[2] != nullptr) {
    float g[kPer];
    load8(row[2], P.dtype[2], j, len, P.vec, g);
#pragma unroll
    for (int k = 0; k < kPer; ++k) b[k] = rklu::teacher_logit(b[k], g[k], P.alpha);
  }
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    a[k] *= P.inv_t;
    b[k] *= P.inv_t;
  }
}

// Pass 1 over entries [0, len) of `rows`, strided over the block's threads: this thread's online statistics.
template <int kThreads>
__device__ __forceinline__ void thread_stats(const char* const (&rows)[3], const FwdParams& P, int len,
                                             rklu::Stats& st_a, rklu::Stats& st_b) {
  st_a = rklu::stats_empty();
  st_b = rklu::stats_empty();
  for (int j = threadIdx.x * kPer; j < len; j += kThreads * kPer) {
    float a[kPer], b[kPer];
    scaled8(rows, P, j, len, a, b);
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
}

// Pass 2 over entries [0, len): the gradient times grad_scale/T, written to grad_row[0, len).
template <int kThreads>
__device__ __forceinline__ void write_grad(const char* const (&rows)[3], const FwdParams& P, int len,
                                           const rklu::RowResult& r, char* grad_row) {
  const float coef = *P.grad_scale * P.inv_t;
  const bool nan_row = rklu::row_is_nan(r);
  for (int j = threadIdx.x * kPer; j < len; j += kThreads * kPer) {
    float a[kPer], b[kPer];
    scaled8(rows, P, j, len, a, b);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      a[k] = nan_row  ? CUDART_NAN_F
             : P.reverse ? rklu::grad_reverse(a[k], b[k], r, coef)
                         : rklu::grad_forward(a[k], b[k], r, coef);
    }
    store8(grad_row, P.dtype[0], j, len, P.vec, a);
  }
}

template <int kThreads>
__device__ __forceinline__ void write_zeros(char* grad_row, int dtype, int len, bool vec) {
  const float zero[kPer] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int j = threadIdx.x * kPer; j < len; j += kThreads * kPer) store8(grad_row, dtype, j, len, vec, zero);
}

// rowwise: one block per row, both passes read global memory.
constexpr int kRowThreads = 512;

__global__ void __launch_bounds__(kRowThreads, 2) kl_fwd_rowwise_kernel(const FwdParams P) {
  __shared__ rklu::Stats reduce_a[kRowThreads / 32 + 1], reduce_b[kRowThreads / 32 + 1];
  const int64_t row = blockIdx.x;
  const int64_t t = P.teacher_row[row];
  CUDA_KERNEL_ASSERT(t < P.teacher_rows);
  char* grad_row = P.grad == nullptr ? nullptr : P.grad + row * P.V * elem_size(P.dtype[0]);
  if (t < 0) {  // ignored row: no reads, zeros out
    if (threadIdx.x == 0) P.loss[row] = 0.f;
    if (grad_row != nullptr) write_zeros<kRowThreads>(grad_row, P.dtype[0], P.V, P.vec);
    return;
  }
  const char* rows[3] = {P.in[0] + row * P.row_bytes[0], P.in[1] + t * P.row_bytes[1],
                         P.in[2] == nullptr ? nullptr : P.in[2] + t * P.row_bytes[2]};
  rklu::Stats st_a, st_b;
  thread_stats<kRowThreads>(rows, P, P.V, st_a, st_b);
  st_a = block_merge<kRowThreads>(st_a, reduce_a);
  st_b = block_merge<kRowThreads>(st_b, reduce_b);
  const rklu::RowResult r = rklu::finish_row(st_a, st_b, P.reverse);
  if (threadIdx.x == 0) P.loss[row] = r.kl;
  if (grad_row != nullptr) write_grad<kRowThreads>(rows, P, P.V, r, grad_row);
}

// cluster: persistent clusters of C CTAs; cluster k handles rows k, k + K, k + 2K, ... (K clusters in the grid), and
// CTA `rank` of a cluster owns entries [rank·slice, rank·slice + len) of each. Two shared-memory buffers per CTA: the
// next row's slice is copied in (cp.async) while the current one is computed, so copies overlap arithmetic.
constexpr int kClusterThreads = 512;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Issue (not wait for) the 16-byte copies of row `row`'s slice [lo, lo + len) of every input into `dst`.
__device__ __forceinline__ void issue_slice_copies(const FwdParams& P, int64_t row, int64_t t, int lo, int len,
                                                   char* dst) {
  if (t < 0) return;  // ignored row: nothing to read
  const int64_t src_row[3] = {row, t, t};
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    if (P.in[k] == nullptr) continue;
    const int es = elem_size(P.dtype[k]);
    const char* src = P.in[k] + src_row[k] * P.row_bytes[k] + static_cast<int64_t>(lo) * es;
    char* d = dst + P.smem_offset[k];
    const int bytes = len * es, n16 = bytes / 16;
    for (int i = threadIdx.x; i < n16; i += kClusterThreads) __pipeline_memcpy_async(d + 16 * i, src + 16 * i, 16);
    for (int i = 16 * n16 + threadIdx.x; i < bytes; i += kClusterThreads) d[i] = src[i];  // < 16 tail bytes
  }
}
#endif

__global__ void __launch_bounds__(kClusterThreads, 2) kl_fwd_cluster_kernel(const FwdParams P, int64_t N) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  extern __shared__ __align__(16) char staged[];  // two buffers of P.slice_bytes
  __shared__ rklu::Stats reduce_a[kClusterThreads / 32 + 1], reduce_b[kClusterThreads / 32 + 1];
  __shared__ rklu::Stats slice_stats[2];  // this CTA's (student, teacher) statistics, read by the whole cluster
  cg::cluster_group cluster = cg::this_cluster();
  const int C = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t first = blockIdx.x / C, stride = gridDim.x / C;
  const int lo = rank * P.slice;
  const int len = max(0, min(P.V - lo, P.slice));
  const int g_es = elem_size(P.dtype[0]);

  int64_t t_next = first < N ? P.teacher_row[first] : -1;
  if (first < N) issue_slice_copies(P, first, t_next, lo, len, staged);
  __pipeline_commit();
  int buf = 0;
  for (int64_t row = first; row < N; row += stride, buf ^= 1) {
    const int64_t t = t_next;
    CUDA_KERNEL_ASSERT(t < P.teacher_rows);
    const int64_t next = row + stride;
    t_next = next < N ? P.teacher_row[next] : -1;
    // buffer buf ^ 1 was last read in the previous iteration, which ended with a barrier
    if (next < N) issue_slice_copies(P, next, t_next, lo, len, staged + (buf ^ 1) * P.slice_bytes);
    __pipeline_commit();
    __pipeline_wait_prior(1);  // this row's copies (the older group) have landed
    __syncthreads();
    char* grad_slice = P.grad == nullptr ? nullptr : P.grad + (row * P.V + lo) * g_es;
    if (t < 0) {  // the whole cluster takes this branch: no cluster barrier is skipped by only some CTAs
      if (rank == 0 && threadIdx.x == 0) P.loss[row] = 0.f;
      if (grad_slice != nullptr) write_zeros<kClusterThreads>(grad_slice, P.dtype[0], len, P.vec);
      continue;  // nothing was read from the buffer: no barrier needed before it is refilled
    }
    char* base = staged + buf * P.slice_bytes;
    const char* rows[3] = {base + P.smem_offset[0], base + P.smem_offset[1],
                           P.in[2] == nullptr ? nullptr : base + P.smem_offset[2]};
    rklu::Stats st_a, st_b;
    thread_stats<kClusterThreads>(rows, P, len, st_a, st_b);
    st_a = block_merge<kClusterThreads>(st_a, reduce_a);
    st_b = block_merge<kClusterThreads>(st_b, reduce_b);
    if (threadIdx.x == 0) {
      slice_stats[0] = st_a;
      slice_stats[1] = st_b;
    }
    cluster.sync();  // every CTA's slice statistics are written
    st_a = rklu::stats_empty();
    st_b = rklu::stats_empty();
    for (int k = 0; k < C; ++k) {  // rank order in every CTA: the same bits everywhere, run to run
      const rklu::Stats* peer = cluster.map_shared_rank(slice_stats, k);
      st_a = rklu::merge(st_a, peer[0]);
      st_b = rklu::merge(st_b, peer[1]);
    }
    cluster.sync();  // all peers have read slice_stats before anyone rewrites it (or leaves)
    const rklu::RowResult r = rklu::finish_row(st_a, st_b, P.reverse);
    if (rank == 0 && threadIdx.x == 0) P.loss[row] = r.kl;
    if (grad_slice != nullptr) write_grad<kClusterThreads>(rows, P, len, r, grad_slice);
    __syncthreads();  // the buffer is read completely before the next iteration refills it
  }
  __pipeline_wait_prior(0);
#else
  __trap();  // never launched: the host checks that the loaded binary is sm_90+ first
#endif
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

int round16(int64_t bytes) { return static_cast<int>((bytes + 15) / 16 * 16); }

int max_shared_optin(int device) {
  int value = 0;  // a host-side attribute query: no device synchronisation
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return value;
}

// Whether the cluster kernel's loaded binary is sm_90+ code on this device (cached per device: attribute queries
// are host-side but not free).
bool cluster_kernel_runs(int device) {
  static int cached[64] = {};  // 0 unknown, 1 yes, 2 no
  if (device < 0 || device >= 64) return false;
  if (cached[device] == 0) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    cudaFuncAttributes attr{};
    const bool ok = major >= 9 && cudaFuncGetAttributes(&attr, kl_fwd_cluster_kernel) == cudaSuccess &&
                    attr.binaryVersion >= 90;
    (void)cudaGetLastError();  // a failed query must not surface as a later launch's error
    if (ok) {  // once: allow the largest dynamic shared memory; each launch asks only for what it needs
      C10_CUDA_CHECK(cudaFuncSetAttribute(kl_fwd_cluster_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          max_shared_optin(device) - static_cast<int>(attr.sharedSizeBytes)));
    }
    cached[device] = ok ? 1 : 2;
  }
  return cached[device] == 1;
}

// RKLU_CUDA_KERNEL=auto (default) | cluster | rowwise; read per call so a test can switch paths.
enum class KernelChoice { kAuto, kCluster, kRowwise };
KernelChoice kernel_choice() {
  const char* v = std::getenv("RKLU_CUDA_KERNEL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return KernelChoice::kAuto;
  if (std::strcmp(v, "cluster") == 0) return KernelChoice::kCluster;
  if (std::strcmp(v, "rowwise") == 0) return KernelChoice::kRowwise;
  TORCH_CHECK(false, "rklu_fast: RKLU_CUDA_KERNEL must be auto, cluster or rowwise, got '", v, "'");
}

// The cluster size for rows of `bytes_per_entry` bytes per entry (the inputs together): the smallest C whose
// slices fit in kSliceTarget bytes (two buffers each, and two CTAs per SM: 4 × 52 KB of the 228 KB), else the largest
// cluster if its two buffers fit at all; 0: none does.
constexpr int kSliceTarget = 52 * 1024;
constexpr int kMaxCluster = 8;  // the portable cluster size

int64_t slice_entries_for(int64_t V, int C) { return ((V + C - 1) / C + kPer - 1) / kPer * kPer; }

int cluster_size(int64_t V, int64_t bytes_per_entry, int smem_limit, int* slice_entries, int* slice_bytes) {
  int C = 1;
  while (C < kMaxCluster && slice_entries_for(V, C) * bytes_per_entry > kSliceTarget) C *= 2;
  // each input's slice starts 16-byte aligned (slice % 8 == 0); 1 KB stays for the static reduction buffers
  const int64_t bytes = slice_entries_for(V, C) * bytes_per_entry;
  if (2 * bytes > smem_limit - 1024) return 0;
  *slice_entries = static_cast<int>(slice_entries_for(V, C));
  *slice_bytes = static_cast<int>(bytes);
  return C;
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
  TORCH_CHECK(V < (int64_t{1} << 28), "rklu_fast: vocab ", V, " too large for the CUDA kernel");
  at::Tensor loss = at::empty({N}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({N, V}, student.options()) : at::empty({0}, student.options());
  if (N == 0) return {loss, grad};
  const at::Tensor rows = teacher_row.contiguous();
  const at::Tensor scale = grad_scale.contiguous();

  FwdParams P{};
  const at::Tensor* inputs[3] = {&student, &original, augmented.has_value() ? &*augmented : nullptr};
  bool vec = !compute_grad || (V * student.element_size()) % 16 == 0;  // grad rows (allocator-aligned base)
  int64_t bytes_per_entry = 0;
  for (int k = 0; k < 3; ++k) {
    if (inputs[k] == nullptr) continue;
    const at::Tensor& x = *inputs[k];
    P.in[k] = static_cast<const char*>(x.data_ptr());
    P.row_bytes[k] = x.stride(0) * x.element_size();
    P.dtype[k] = dtype_code(x.scalar_type());
    bytes_per_entry += x.element_size();
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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = student.get_device();

  // The cluster kernel needs sm_90 code, 16-byte aligned rows (cp.async) and slices that fit in shared memory.
  const KernelChoice choice = kernel_choice();
  int C = 0;
  if (choice != KernelChoice::kRowwise && vec && cluster_kernel_runs(device)) {
    C = cluster_size(V, bytes_per_entry, max_shared_optin(device), &P.slice, &P.slice_bytes);
  }
  TORCH_CHECK(C > 0 || choice != KernelChoice::kCluster, "rklu_fast: RKLU_CUDA_KERNEL=cluster, but these rows ",
              "cannot use it (needs sm_90 code, 16-byte aligned rows, and slices that fit in shared memory)");
  if (C > 0) {
    int offset = 0;
    for (int k = 0; k < 3; ++k) {
      if (inputs[k] == nullptr) continue;
      P.smem_offset[k] = offset;
      offset += round16(int64_t{P.slice} * inputs[k]->element_size());
    }
    cudaLaunchConfig_t config{};
    config.blockDim = dim3(kClusterThreads);
    config.dynamicSmemBytes = static_cast<size_t>(2 * P.slice_bytes);
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = static_cast<unsigned>(C);
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    // Persistent: as many clusters as fit on the GPU at once (never more than rows).
    config.gridDim = dim3(static_cast<unsigned>(C));
    int resident = 0;
    if (cudaOccupancyMaxActiveClusters(&resident, kl_fwd_cluster_kernel, &config) != cudaSuccess || resident < 1) {
      (void)cudaGetLastError();
      resident = 1;
    }
    config.gridDim = dim3(static_cast<unsigned>(std::min<int64_t>(N, resident) * C));
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kl_fwd_cluster_kernel, P, N));
  } else {
    kl_fwd_rowwise_kernel<<<static_cast<unsigned>(N), kRowThreads, 0, stream>>>(P);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, grad};
}

void kl_scale_grad_cuda(at::Tensor& grad, at::Tensor& applied, const at::Tensor& grad_output_rows) {
  rklu::check_scale_args(grad, applied, grad_output_rows);
  check_same_cuda(grad, grad, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t N = grad.size(0), V = grad.size(1);
  if (N == 0) return;
  TORCH_CHECK(V < (int64_t{1} << 28), "rklu_fast: vocab ", V, " too large for the CUDA kernel");
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
