#pragma once
// Argument checks shared by the CPU and CUDA entry points. sokd.ops validates the public API
// in Python; these TORCH_CHECKs guard direct calls of torch.ops.sokd.* so that bad input
// raises instead of reading out of bounds.

#include <ATen/ATen.h>

namespace sokd {

// The largest max-pool window of interest_map (sokd.ops.MAX_KERNEL): any window of
// 2 * max(H, W) - 1 or more already covers the whole map, and bounding it keeps every
// kernel's work estimate and window arithmetic far from overflow.
constexpr int64_t kMaxKernel = 4095;

inline void check_floating(const at::Tensor& value, const char* name) {
  auto dtype = value.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              name, " must be float16, bfloat16, float32 or float64, got ", dtype);
}

inline void check_on(const at::Tensor& value, const char* name, c10::DeviceType device) {
  TORCH_CHECK(value.device().type() == device, name, " must be a ", c10::DeviceTypeName(device),
              " tensor, got one on ", value.device());
}

inline void check_not_empty(const at::Tensor& value, const char* name) {
  TORCH_CHECK(value.numel() > 0, name, " must not be empty, got shape ", value.sizes());
}

inline void check_pair(const at::Tensor& student, const char* student_name,
                       const at::Tensor& teacher, const char* teacher_name,
                       c10::DeviceType device) {
  check_on(student, student_name, device);
  check_on(teacher, teacher_name, device);
  check_floating(student, student_name);
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), teacher_name, " has dtype ",
              teacher.scalar_type(), " but ", student_name, " has ", student.scalar_type());
  TORCH_CHECK(teacher.sizes() == student.sizes(), teacher_name, " must have the shape of ",
              student_name, " ", student.sizes(), ", got ", teacher.sizes());
  check_not_empty(student, student_name);
}

inline void check_masked_feature_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                        const std::optional<at::Tensor>& mask,
                                        c10::DeviceType device) {
  TORCH_CHECK(student.dim() == 4, "student must be 4-D (N x C x H x W), got shape ",
              student.sizes());
  check_pair(student, "student", teacher, "teacher", device);
  if (mask.has_value()) {
    check_on(*mask, "mask", device);
    check_floating(*mask, "mask");
    TORCH_CHECK(mask->dim() == 3 && mask->size(0) == student.size(0) &&
                    mask->size(1) == student.size(2) && mask->size(2) == student.size(3),
                "mask must have shape N x H x W = [", student.size(0), ", ", student.size(2),
                ", ", student.size(3), "], got ", mask->sizes());
  }
}

inline void check_logit_inputs(const at::Tensor& student, const at::Tensor& teacher,
                               double temperature, c10::DeviceType device) {
  TORCH_CHECK(student.dim() == 2 || student.dim() == 4,
              "student_logits must be N x K or dense N x K x H x W, got shape ", student.sizes());
  check_pair(student, "student_logits", teacher, "teacher_logits", device);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "temperature must be a finite number > 0, got ", temperature);
}

// N x K logits, or dense N x K x H x W ones with one row per position: the sizes a loss kernel
// walks.
struct LogitRows {
  int64_t batch, classes, positions, rows;
};

inline LogitRows logit_rows(const at::Tensor& logits) {
  const int64_t batch = logits.size(0);
  const int64_t positions = logits.dim() == 4 ? logits.size(2) * logits.size(3) : 1;
  return {batch, logits.size(1), positions, batch * positions};
}

// The (N, H, W) or (N,) shape with one value per logit row.
inline std::vector<int64_t> row_shape(const at::Tensor& logits) {
  std::vector<int64_t> shape{logits.size(0)};
  for (int64_t d = 2; d < logits.dim(); ++d) shape.push_back(logits.size(d));
  return shape;
}

inline void check_row_weight(const std::optional<at::Tensor>& weight, const at::Tensor& logits,
                             c10::DeviceType device) {
  if (!weight.has_value()) return;
  check_on(*weight, "weight", device);
  check_floating(*weight, "weight");
  TORCH_CHECK(weight->sizes() == at::IntArrayRef(row_shape(logits)),
              "weight must hold one value per row, shape ", at::IntArrayRef(row_shape(logits)),
              ", got ", weight->sizes());
}

inline void check_class_mask(const at::Tensor& class_mask, const at::Tensor& logits,
                             c10::DeviceType device) {
  check_on(class_mask, "class_mask", device);
  TORCH_CHECK(class_mask.scalar_type() == at::kBool, "class_mask must be a bool tensor, got ",
              class_mask.scalar_type());
  TORCH_CHECK(class_mask.sizes() == logits.sizes(), "class_mask must have the shape of the logits ",
              logits.sizes(), ", got ", class_mask.sizes());
}

inline void check_decoupled_kd_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                      const at::Tensor& class_mask, double alpha, double beta,
                                      double temperature, c10::DeviceType device) {
  check_logit_inputs(student, teacher, temperature, device);
  check_class_mask(class_mask, student, device);
  TORCH_CHECK(std::isfinite(alpha) && alpha >= 0 && std::isfinite(beta) && beta >= 0,
              "alpha and beta must be finite and >= 0, got ", alpha, " and ", beta);
}

inline void check_interest_inputs(const at::Tensor& heat, const at::Tensor& wh,
                                  const at::Tensor& offset, int64_t k, int64_t kernel,
                                  c10::DeviceType device) {
  TORCH_CHECK(heat.dim() == 4, "heat must be 4-D (N x heat_channels x H x W), got shape ",
              heat.sizes());
  check_on(heat, "heat", device);
  check_floating(heat, "heat");
  check_not_empty(heat, "heat");
  const std::vector<int64_t> box_shape{heat.size(0), 2, heat.size(2), heat.size(3)};
  for (auto [value, name] : {std::pair<const at::Tensor&, const char*>{wh, "wh"},
                             std::pair<const at::Tensor&, const char*>{offset, "offset"}}) {
    check_on(value, name, device);
    TORCH_CHECK(value.scalar_type() == heat.scalar_type(), name, " has dtype ",
                value.scalar_type(), " but heat has ", heat.scalar_type());
    TORCH_CHECK(value.sizes() == at::IntArrayRef(box_shape), name, " must have shape ",
                at::IntArrayRef(box_shape), ", got ", value.sizes());
  }
  const int64_t candidates = heat.size(1) * heat.size(2) * heat.size(3);
  TORCH_CHECK(k >= 1 && k <= candidates, "k must be in [1, heat_channels*H*W = ", candidates,
              "], got ", k);
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1 && kernel <= kMaxKernel,
              "kernel must be a positive odd number of at most ", kMaxKernel, ", got ", kernel);
}

}  // namespace sokd
