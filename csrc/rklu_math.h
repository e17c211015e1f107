// The RKLU loss math, once, for the CPU kernel (rklu_cpu.cpp) and the CUDA kernel (rklu_cuda.cu).
// Contract: docs/kernel-contract.md. With a = z_student/T, b = l_teacher/T, p = softmax(a), q = softmax(b):
//
//   statistics of one distribution x against the other side y (an online softmax over vocab chunks):
//     m = max x,  s = Σ e^{x−m},  w = Σ e^{x−m}(x − y)            (w: the KL numerator of the side the KL is under)
//   KL(x‖y) = w/s − (m_x − m_y) − log(s_x/s_y)                      (differences: a small KL is not lost near log V)
//   reverse (x = a, y = b):  ∂KL/∂z(v) = p(v)·(log p(v) − log q(v) − KL) / T
//   forward (x = b, y = a):  ∂KL/∂z(v) = (p(v) − q(v)) / T
//
// −inf rules: an entry whose own logit is −inf adds 0 (0·log 0 = 0); a finite logit against −inf on the other side
// adds +inf; a side with no finite entry has s = 0, so its KL is NaN (no distribution); NaN propagates through m.
//
// Every elementwise formula is a template over the value type V: `float` on the GPU (and for scalars on the host),
// `at::vec::Vectorized<float>` in the CPU kernel. The primitives they use (rk_exp, rk_where, rk_max, ...) are
// overloaded for both below, so both kernels run literally the same expressions.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define RKLU_HD __host__ __device__ __forceinline__
#else
#define RKLU_HD inline
#include <ATen/cpu/vec/vec.h>
#endif

namespace rklu {

// ---------------------------------------------------------------------------------------------- primitives: float
RKLU_HD float rk_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);  // arguments are ≤ 0 (x − max): the fast intrinsic is accurate there
#else
  return std::exp(x);
#endif
}
RKLU_HD float rk_log(float x) { return logf(x); }  // a few calls per row: the accurate one
RKLU_HD float rk_where(bool c, float x, float y) { return c ? x : y; }
// max that propagates NaN from either side (fmaxf would drop it and hide a NaN row)
RKLU_HD float rk_max(float x, float y) { return (x > y || x != x) ? x : y; }

#if !defined(__CUDACC__)
// --------------------------------------------------------------------------- primitives: at::vec (CPU kernel only)
using Vec = at::vec::Vectorized<float>;
// ≤ 20 ulp; x < ln(FLT_MIN), −inf included, gives 0. It maps NaN to a number: NaN rows are caught by row_is_nan.
inline Vec rk_exp(Vec x) { return x.exp_u20(); }
inline Vec rk_where(Vec mask, Vec x, Vec y) { return Vec::blendv(y, x, mask); }
inline Vec rk_max(Vec x, Vec y) { return at::vec::maximum(x, y); }  // NaN-propagating
#endif

constexpr float kInf = INFINITY;

// ------------------------------------------------------------------------------------------- elementwise formulas
// Teacher logit l_t = l_o − α·relu(l_aug − l_o); −inf where l_o is −inf; a NaN difference stays NaN.
template <class V>
RKLU_HD V teacher_logit(V lo, V laug, float alpha) {
  V d = laug - lo;
  V relu = rk_where(d < V(0.f), V(0.f), d);
  return rk_where(lo == V(-kInf), lo, lo - V(alpha) * relu);
}

// A max that is −inf means every entry so far is −inf: shift by 0 instead so e^{−inf − 0} = 0, not e^{NaN}.
RKLU_HD float safe_shift(float m) { return m == -kInf ? 0.f : m; }

// e^{x−m}·(x − y), the numerator term of one entry of the side x (e = e^{x−m} computed by the caller).
template <class V>
RKLU_HD V numerator_term(V x, V y, V e) {
  return rk_where(x == V(-kInf), V(0.f), rk_where(y == V(-kInf), V(kInf), e * (x - y)));
}

// ------------------------------------------------------------------------------------------ row statistics (float)
// Online softmax statistics of one side; w is only accumulated for the side the KL is taken under.
struct Stats {
  float m;  // running max
  float s;  // Σ e^{x−m}
  float w;  // Σ e^{x−m}(x − y)
};

RKLU_HD Stats stats_empty() { return Stats{-kInf, 0.f, 0.f}; }

// The same sums expressed relative to a new max m_new ≥ st.m. A +inf numerator stays +inf (not inf·0 = NaN).
RKLU_HD Stats rebase(Stats st, float m_new) {
  float f = st.m == m_new ? 1.f : rk_exp(st.m - m_new);  // −inf → −inf: factor 1, no NaN
  return Stats{m_new, st.s * f, st.w == kInf ? st.w : st.w * f};
}

// Statistics of the union of two disjoint slices (associative and commutative up to rounding).
RKLU_HD Stats merge(Stats x, Stats y) {
  float m = rk_max(x.m, y.m);
  x = rebase(x, m);
  y = rebase(y, m);
  return Stats{m, x.s + y.s, x.w + y.w};
}

// KL(x‖y) from the statistics of the side it is taken under (x, holding w) and the other side (y).
RKLU_HD float kl_from_stats(Stats x, Stats y) { return x.w / x.s - (x.m - y.m) - rk_log(x.s / y.s); }

// Everything the gradient pass needs, from the two sides' statistics.
struct RowResult {
  float kl;
  float m_a, inv_s_a;  // student: p = e^{a − m_a}·inv_s_a (m_a shifted by safe_shift)
  float m_b, inv_s_b;  // teacher: q likewise
  float shift;         // reverse gradient: (m_a − m_b) + log(S_a/S_b) + KL = lse_a − lse_b + KL, without lse
};

RKLU_HD RowResult finish_row(Stats student, Stats teacher, bool reverse) {
  RowResult r;
  r.kl = reverse ? kl_from_stats(student, teacher) : kl_from_stats(teacher, student);
  r.m_a = safe_shift(student.m);
  r.inv_s_a = 1.f / student.s;
  r.m_b = safe_shift(teacher.m);
  r.inv_s_b = 1.f / teacher.s;
  r.shift = (student.m - teacher.m) + rk_log(student.s / teacher.s) + r.kl;
  return r;
}

// Probabilities are formed as e^{x − m}·(1/S), never e^{x − lse}: x − m is exact where it matters (x near its max),
// whereas rounding lse = m + log S to fp32 costs up to ulp(|x|) in the exponent — a relative error of 1e-3 in p
// for logits of ±1e4.
// reverse gradient (times `coef` = grad_scale/T): p·((a − b) − shift); 0 where a = −inf.
template <class V>
RKLU_HD V grad_reverse(V a, V b, const RowResult& r, float coef) {
  V g = rk_exp(a - V(r.m_a)) * V(r.inv_s_a * coef) * ((a - b) - V(r.shift));
  return rk_where(a == V(-kInf), V(0.f), g);
}

// forward gradient (times `coef`): (p − q).
template <class V>
RKLU_HD V grad_forward(V a, V b, const RowResult& r, float coef) {
  return (rk_exp(a - V(r.m_a)) * V(r.inv_s_a) - rk_exp(b - V(r.m_b)) * V(r.inv_s_b)) * V(coef);
}

// A NaN KL (no distribution, or a NaN input) gives a NaN gradient row, as softmax would.
RKLU_HD bool row_is_nan(const RowResult& r) { return r.kl != r.kl; }

}  // namespace rklu
