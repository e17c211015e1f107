// CPU kernels of the RKLU loss, the op schemas (namespace rklu_fast) and their CPU + Meta implementations.
// Contract: docs/kernel-contract.md; math: rklu_math.h. Rows run in parallel (at::parallel_for, OpenMP); each row is
// one thread's work in a fixed order, so results are bitwise the same for any thread count.
//
// Per row: pass 1 streams the row in chunks of kChunk entries (fp32 read in place, 16-bit converted into L1-sized
// buffers), writes the chunk's scaled logits to L1 while taking their max, rebases the running statistics once per
// chunk and accumulates e^{x−m} with at::vec. Pass 2 (only with compute_grad) re-reads the row — mostly from L2, it
// was just read — and writes the gradient in the student's dtype. No [N, V] temporaries.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "rklu_checks.h"
#include "rklu_math.h"

namespace {

using rklu::Vec;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kChunk = 1024;             // entries per chunk: three fp32 buffers stay in L1
constexpr int64_t kBuf = kChunk + 2 * kLanes;  // 16-bit loads convert a whole Vectorized<T> (2 × kLanes)

// ------------------------------------------------------------------------------------ dtype conversion of a chunk
using LoadFn = void (*)(const void* src, int64_t n, float* dst);
using StoreFn = void (*)(const float* src, int64_t n, void* dst);

template <class T>
void load_as_float(const void* src_, int64_t n, float* dst) {
  const T* src = static_cast<const T*>(src_);
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    constexpr int64_t w = at::vec::Vectorized<T>::size();
    for (int64_t i = 0; i < n; i += w) {
      auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(src + i, std::min(w, n - i)));
      lo.store(dst + i);
      hi.store(dst + i + w / 2);
    }
  }
}

template <class T>
void store_from_float(const float* src, int64_t n, void* dst_) {
  T* dst = static_cast<T*>(dst_);
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    constexpr int64_t w = at::vec::Vectorized<T>::size();
    for (int64_t i = 0; i < n; i += w) {
      auto v = at::vec::convert_from_float<T>(Vec::loadu(src + i), Vec::loadu(src + i + w / 2));
      v.store(dst + i, std::min(w, n - i));
    }
  }
}

LoadFn loader(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return load_as_float<float>;
    case at::kBFloat16: return load_as_float<at::BFloat16>;
    case at::kHalf: return load_as_float<at::Half>;
    default: TORCH_CHECK(false, "rklu_fast: unsupported dtype ", t);
  }
}

StoreFn storer(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return store_from_float<float>;
    case at::kBFloat16: return store_from_float<at::BFloat16>;
    case at::kHalf: return store_from_float<at::Half>;
    default: TORCH_CHECK(false, "rklu_fast: unsupported dtype ", t);
  }
}

float hmax(Vec v) {
  float x[kLanes];
  v.store(x);
  float m = x[0];
  for (int64_t i = 1; i < kLanes; ++i) m = rklu::rk_max(m, x[i]);
  return m;
}

float hsum(Vec v) {
  float x[kLanes];
  v.store(x);
  float s = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) s += x[i];
  return s;
}

// ------------------------------------------------------------------------------------------------ the row kernel
struct Input {
  const char* data;   // nullptr: absent (no augmented model)
  int64_t row_bytes;  // row stride in bytes
  int64_t elem;
  bool is_float;      // fp32 rows are read in place; 16-bit rows are converted chunk by chunk
  LoadFn load;
};

Input make_input(const at::Tensor& t) {
  return Input{static_cast<const char*>(t.data_ptr()), t.stride(0) * static_cast<int64_t>(t.element_size()),
               static_cast<int64_t>(t.element_size()), t.scalar_type() == at::kFloat, loader(t.scalar_type())};
}

// Entries c0..c0+n of a row as fp32: the row itself, or its conversion into `buf`.
const float* chunk_as_float(const Input& in, int64_t row, int64_t c0, int64_t n, float* buf) {
  if (in.data == nullptr) return nullptr;
  const char* src = in.data + row * in.row_bytes + c0 * in.elem;
  if (in.is_float) return reinterpret_cast<const float*>(src);
  in.load(src, n, buf);
  return buf;
}

// The last, partial vector of a chunk: lanes past `count` hold −inf, which adds nothing to any sum.
Vec load_tail(const float* p, int64_t count) {
  alignas(32) float x[kLanes];
  std::fill(x, x + kLanes, -rklu::kInf);
  std::copy(p, p + count, x);
  return Vec::loadu(x);
}

struct Problem {
  Input student, original, augmented;
  int64_t V;
  float alpha, inv_t;
};

// One chunk of a row pair as fp32 pointers, and the scaled logits a = z/T, b = l_t/T of its vector i.
struct Chunk {
  const float *s, *o, *g;
  int64_t n;

  Chunk(const Problem& pb, int64_t srow, int64_t trow, int64_t c0, int64_t n_, float* bs, float* bo, float* bg)
      : s(chunk_as_float(pb.student, srow, c0, n_, bs)),
        o(chunk_as_float(pb.original, trow, c0, n_, bo)),
        g(chunk_as_float(pb.augmented, trow, c0, n_, bg)),
        n(n_) {}

  void scaled(int64_t i, const Problem& pb, Vec& a, Vec& b) const {
    const bool whole = i + kLanes <= n;
    const Vec vs = whole ? Vec::loadu(s + i) : load_tail(s + i, n - i);
    Vec lt = whole ? Vec::loadu(o + i) : load_tail(o + i, n - i);
    if (g != nullptr) lt = rklu::teacher_logit(lt, whole ? Vec::loadu(g + i) : load_tail(g + i, n - i), pb.alpha);
    a = vs * Vec(pb.inv_t);
    b = lt * Vec(pb.inv_t);
  }
};

struct Scratch {  // per thread, L1-sized
  alignas(64) float s[kBuf], o[kBuf], g[kBuf], a[kBuf], b[kBuf];
};

template <bool kReverse>
rklu::RowResult row_stats(const Problem& pb, int64_t srow, int64_t trow, Scratch& w) {
  rklu::Stats st_a = rklu::stats_empty(), st_b = rklu::stats_empty();
  for (int64_t c0 = 0; c0 < pb.V; c0 += kChunk) {
    const Chunk ch(pb, srow, trow, c0, std::min(kChunk, pb.V - c0), w.s, w.o, w.g);
    // scaled logits into L1 and the chunk's max, then one rebase per chunk and the sums
    Vec ma(-rklu::kInf), mb(-rklu::kInf);
    for (int64_t i = 0; i < ch.n; i += kLanes) {
      Vec a, b;
      ch.scaled(i, pb, a, b);
      ma = rklu::rk_max(ma, a);
      mb = rklu::rk_max(mb, b);
      a.store(w.a + i);
      b.store(w.b + i);
    }
    st_a = rklu::rebase(st_a, rklu::rk_max(st_a.m, hmax(ma)));
    st_b = rklu::rebase(st_b, rklu::rk_max(st_b.m, hmax(mb)));
    const Vec sh_a(rklu::safe_shift(st_a.m)), sh_b(rklu::safe_shift(st_b.m));
    Vec sa(0.f), sb(0.f), num(0.f);
    for (int64_t i = 0; i < ch.n; i += kLanes) {
      const Vec a = Vec::loadu(w.a + i), b = Vec::loadu(w.b + i);
      const Vec ea = rklu::rk_exp(a - sh_a), eb = rklu::rk_exp(b - sh_b);
      sa += ea;
      sb += eb;
      num += kReverse ? rklu::numerator_term(a, b, ea) : rklu::numerator_term(b, a, eb);
    }
    st_a.s += hsum(sa);
    st_b.s += hsum(sb);
    (kReverse ? st_a : st_b).w += hsum(num);
  }
  return rklu::finish_row(st_a, st_b, kReverse);
}

template <bool kReverse>
void row_grad(const Problem& pb, int64_t srow, int64_t trow, const rklu::RowResult& r, float coef, char* grad_row,
              const Input& grad_type, StoreFn store, Scratch& w) {
  const bool nan_row = rklu::row_is_nan(r);
  for (int64_t c0 = 0; c0 < pb.V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, pb.V - c0);
    // fp32 gradients go straight to the output row; 16-bit ones through w.a and one conversion per chunk
    float* out = grad_type.is_float ? reinterpret_cast<float*>(grad_row) + c0 : w.a;
    if (nan_row) {
      std::fill(out, out + n, std::numeric_limits<float>::quiet_NaN());
    } else {
      const Chunk ch(pb, srow, trow, c0, n, w.s, w.o, w.g);
      for (int64_t i = 0; i < n; i += kLanes) {
        Vec a, b;
        ch.scaled(i, pb, a, b);
        const Vec g = kReverse ? rklu::grad_reverse(a, b, r, coef)
                               : rklu::grad_forward(a, b, r, coef);
        g.store(out + i, std::min(kLanes, n - i));
      }
    }
    if (!grad_type.is_float) store(w.a, n, grad_row + c0 * grad_type.elem);
  }
}

// ----------------------------------------------------------------------------------------------- CPU operators
std::tuple<at::Tensor, at::Tensor> kl_fwd_cpu(const at::Tensor& student, const at::Tensor& original,
                                              const std::optional<at::Tensor>& augmented, const at::Tensor& teacher_row,
                                              const at::Tensor& grad_scale, double alpha, double inv_temperature,
                                              bool reverse, bool compute_grad) {
  rklu::check_fwd_args(student, original, augmented, teacher_row, grad_scale, inv_temperature);
  const int64_t N = student.size(0), V = student.size(1), M = original.size(0);
  at::Tensor loss = at::empty({N}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({N, V}, student.options()) : at::empty({0}, student.options());
  const at::Tensor rows = teacher_row.contiguous();
  const int64_t* trow = rows.data_ptr<int64_t>();
  float* loss_p = loss.data_ptr<float>();
  const float inv_t = static_cast<float>(inv_temperature);
  const float coef = grad_scale.item<float>() * inv_t;  // a CPU tensor: no device sync
  const Input none{nullptr, 0, 0, false, nullptr};
  const Problem pb{make_input(student), make_input(original), augmented.has_value() ? make_input(*augmented) : none,
                   V, static_cast<float>(alpha), inv_t};
  StoreFn store = compute_grad ? storer(student.scalar_type()) : nullptr;
  char* grad_p = compute_grad ? static_cast<char*>(grad.data_ptr()) : nullptr;
  const int64_t g_elem = student.element_size();
  // Checked before the parallel region: an exception must not cross OpenMP threads.
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(trow[i] < M, "rklu_fast: teacher_row[", rklu::num(i), "] = ", rklu::num(trow[i]),
                " but the teacher has ", rklu::num(M), " rows");
  }
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    auto scratch = std::make_unique<Scratch>();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = trow[i];
      char* grad_row = compute_grad ? grad_p + i * V * g_elem : nullptr;
      if (t < 0) {  // ignored row: no reads, zeros out
        loss_p[i] = 0.f;
        if (compute_grad) std::memset(grad_row, 0, V * g_elem);
        continue;
      }
      const rklu::RowResult r = reverse ? row_stats<true>(pb, i, t, *scratch) : row_stats<false>(pb, i, t, *scratch);
      loss_p[i] = r.kl;
      if (!compute_grad) continue;
      if (reverse) {
        row_grad<true>(pb, i, t, r, coef, grad_row, pb.student, store, *scratch);
      } else {
        row_grad<false>(pb, i, t, r, coef, grad_row, pb.student, store, *scratch);
      }
    }
  });
  return {loss, grad};
}

void kl_scale_grad_cpu(at::Tensor& grad, at::Tensor& applied, const at::Tensor& grad_output_rows) {
  rklu::check_scale_args(grad, applied, grad_output_rows);
  const int64_t N = grad.size(0), V = grad.size(1);
  float* applied_p = applied.data_ptr<float>();
  const float* g_p = grad_output_rows.data_ptr<float>();
  char* grad_p = static_cast<char*>(grad.data_ptr());
  const int64_t elem = grad.element_size();
  LoadFn load = loader(grad.scalar_type());
  StoreFn store = storer(grad.scalar_type());
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBuf];
    for (int64_t r = begin; r < end; ++r) {
      if (g_p[r] == applied_p[r]) continue;  // the usual case (g == 1): nothing to read or write
      const Vec factor(g_p[r] / applied_p[r]);
      char* row = grad_p + r * V * elem;
      for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
        const int64_t n = std::min(kChunk, V - c0);
        load(row + c0 * elem, n, buf);
        for (int64_t i = 0; i < n; i += kLanes) (Vec::loadu(buf + i) * factor).store(buf + i);
        store(buf, n, row + c0 * elem);
      }
      applied_p[r] = g_p[r];
    }
  });
}

// ---------------------------------------------------------------------------------- Meta (shapes only, for compile)
std::tuple<at::Tensor, at::Tensor> kl_fwd_meta(const at::Tensor& student, const at::Tensor& original,
                                               const std::optional<at::Tensor>& augmented,
                                               const at::Tensor& teacher_row, const at::Tensor& grad_scale,
                                               double alpha, double inv_temperature, bool reverse, bool compute_grad) {
  rklu::check_fwd_args(student, original, augmented, teacher_row, grad_scale, inv_temperature);
  at::Tensor loss = at::empty({student.size(0)}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({student.size(0), student.size(1)}, student.options())
                                 : at::empty({0}, student.options());
  return {loss, grad};
}

void kl_scale_grad_meta(at::Tensor& grad, at::Tensor& applied, const at::Tensor& grad_output_rows) {
  rklu::check_scale_args(grad, applied, grad_output_rows);
}

}  // namespace

TORCH_LIBRARY(rklu_fast, m) {
  m.def(
      "kl_fwd(Tensor student, Tensor original, Tensor? augmented, Tensor teacher_row, Tensor grad_scale, "
      "float alpha, float inv_temperature, bool reverse, bool compute_grad) -> (Tensor, Tensor)");
  m.def("kl_scale_grad_(Tensor(a!) grad, Tensor(b!) applied, Tensor grad_output_rows) -> ()");
}

TORCH_LIBRARY_IMPL(rklu_fast, CPU, m) {
  m.impl("kl_fwd", &kl_fwd_cpu);
  m.impl("kl_scale_grad_", &kl_scale_grad_cpu);
}

TORCH_LIBRARY_IMPL(rklu_fast, Meta, m) {
  m.impl("kl_fwd", &kl_fwd_meta);
  m.impl("kl_scale_grad_", &kl_scale_grad_meta);
}
