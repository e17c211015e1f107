// Argument checks shared by the CPU, Meta and CUDA operators (host code): clear errors naming the argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace rklu {

// Numbers reach error messages already formatted (std::to_string: snprintf, no iostream facets): streaming a number
// into a TORCH_CHECK message goes through std::ostream's numeric facet, which breaks when the extension's and the
// process's libstdc++ disagree on it; strings stream safely.
inline std::string num(int64_t v) { return std::to_string(v); }
inline std::string num(double v) { return std::to_string(v); }
inline std::string shape(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

inline void check_logits(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "rklu_fast: ", name, " must be 2-D [rows, vocab], got shape ", shape(t.sizes()));
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "rklu_fast: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "rklu_fast: ", name,
              " must have stride(1) == 1 (rows may be strided), got strides ", shape(t.strides()));
}

inline void check_fwd_args(const at::Tensor& student, const at::Tensor& original,
                           const std::optional<at::Tensor>& augmented, const at::Tensor& teacher_row,
                           const at::Tensor& grad_scale, double inv_temperature) {
  check_logits(student, "student");
  check_logits(original, "original");
  TORCH_CHECK(original.size(1) == student.size(1), "rklu_fast: original has vocab ", num(original.size(1)),
              ", student has ", num(student.size(1)));
  if (augmented.has_value()) {
    check_logits(*augmented, "augmented");
    TORCH_CHECK(augmented->sizes() == original.sizes(), "rklu_fast: augmented shape ", shape(augmented->sizes()),
                " differs from original shape ", shape(original.sizes()));
    TORCH_CHECK(augmented->device() == student.device(), "rklu_fast: augmented is on ", augmented->device(),
                ", student on ", student.device());
  }
  TORCH_CHECK(original.device() == student.device(), "rklu_fast: original is on ", original.device(),
              ", student on ", student.device());
  TORCH_CHECK(teacher_row.scalar_type() == at::kLong && teacher_row.dim() == 1 &&
                  teacher_row.size(0) == student.size(0),
              "rklu_fast: teacher_row must be int64 of shape [", num(student.size(0)), "], got ",
              teacher_row.scalar_type(), " ", shape(teacher_row.sizes()));
  TORCH_CHECK(teacher_row.device() == student.device(), "rklu_fast: teacher_row is on ", teacher_row.device(),
              ", student on ", student.device());
  TORCH_CHECK(grad_scale.scalar_type() == at::kFloat && grad_scale.numel() == 1,
              "rklu_fast: grad_scale must be a float32 tensor with one element, got ", grad_scale.scalar_type(), " ",
              shape(grad_scale.sizes()));
  TORCH_CHECK(grad_scale.device() == student.device(), "rklu_fast: grad_scale is on ", grad_scale.device(),
              ", student on ", student.device());
  TORCH_CHECK(inv_temperature > 0.0, "rklu_fast: inv_temperature must be > 0, got ", num(inv_temperature));
}

inline void check_scale_args(const at::Tensor& grad, const at::Tensor& applied, const at::Tensor& grad_output_rows) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(),
              "rklu_fast: grad must be the contiguous [N, V] tensor from kl_fwd");
  for (const at::Tensor* t : {&applied, &grad_output_rows}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == grad.size(0) && t->is_contiguous(),
                "rklu_fast: applied and grad_output_rows must be contiguous float32 [", num(grad.size(0)), "], got ",
                t->scalar_type(), " ", shape(t->sizes()));
    TORCH_CHECK(t->device() == grad.device(), "rklu_fast: applied/grad_output_rows on ", t->device(), ", grad on ",
                grad.device());
  }
}

}  // namespace rklu
