#pragma once
// Host side of feature_augment: checks the op list and its random draws, and packs them into
// the AugmentPlan that the CPU and CUDA kernels evaluate.

#include <ATen/ATen.h>

#include <climits>
#include <string>
#include <vector>

#include "augment_math.h"
#include "op_checks.h"

namespace sokd {

struct PreparedAugment {
  AugmentPlan plan;
  std::vector<at::Tensor> keep_alive;  // contiguous copies the plan points into
};

inline PreparedAugment prepare_augment(const at::Tensor& x, at::IntArrayRef op_ids,
                                       const at::Tensor& values,
                                       const c10::List<std::optional<at::Tensor>>& draws,
                                       at::IntArrayRef noise_seeds, c10::DeviceType device) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N x C x H x W), got shape ", x.sizes());
  check_on(x, "x", device);
  check_floating(x, "x");
  check_not_empty(x, "x");
  const int64_t num_ops = static_cast<int64_t>(op_ids.size());
  TORCH_CHECK(num_ops <= kMaxAugmentOps, "feature_augment takes at most ", kMaxAugmentOps,
              " ops per call, got ", num_ops);
  TORCH_CHECK(values.dim() == 1 && values.size(0) == num_ops,
              "values must hold one value per op, shape [", num_ops, "], got ", values.sizes());
  TORCH_CHECK(static_cast<int64_t>(draws.size()) == num_ops &&
                  static_cast<int64_t>(noise_seeds.size()) == num_ops,
              "draws and noise_seeds must have one entry per op (", num_ops, "), got ",
              draws.size(), " and ", noise_seeds.size());
  const int64_t n = x.size(0), channels = x.size(1);
  TORCH_CHECK(channels <= INT32_MAX && x.size(2) <= INT32_MAX && x.size(3) <= INT32_MAX,
              "x must have fewer than 2^31 channels, rows and columns, got shape ", x.sizes());

  PreparedAugment prepared{};
  AugmentPlan& plan = prepared.plan;
  plan.num_ops = static_cast<int>(num_ops);
  plan.channels = channels;
  plan.height = x.size(2);
  plan.width = x.size(3);
  // The CUDA kernel reads the values on the device: a host copy would wait for the GPU.
  const bool on_cpu = device == c10::DeviceType::CPU;
  const at::Tensor host_values = on_cpu ? values.to(at::kFloat).contiguous() : at::Tensor();
  const float* value_data = on_cpu ? host_values.data_ptr<float>() : nullptr;

  auto draw_for = [&](int64_t i, at::ScalarType dtype, std::vector<int64_t> shape,
                      const char* what) {
    std::optional<at::Tensor> draw = draws.get(i);
    TORCH_CHECK(draw.has_value(), "draws[", i, "] must hold the ", what, " of op ", op_ids[i]);
    check_on(*draw, "draws", device);
    TORCH_CHECK(draw->scalar_type() == dtype && draw->sizes() == at::IntArrayRef(shape),
                "draws[", i, "] (the ", what, ") must be ", dtype, " of shape ",
                at::IntArrayRef(shape), ", got ", draw->scalar_type(), " of shape ",
                draw->sizes());
    at::Tensor contiguous = draw->contiguous();
    prepared.keep_alive.push_back(contiguous);
    return contiguous;
  };

  int affine_ops = 0;
  for (int64_t i = 0; i < num_ops; ++i) {
    const int64_t kind = op_ids[i];
    TORCH_CHECK(kind >= 0 && kind < kNumAugmentKinds, "op_ids must hold op ids in [0, ",
                kNumAugmentKinds - 1, "], got ", kind);
    AugmentOp& op = plan.ops[i];
    op.kind = static_cast<int>(kind);
    op.value = on_cpu ? value_data[i] : 0.f;
    affine_theta(op.kind, op.value, op.theta);
    if (is_affine(op.kind)) {
      ++affine_ops;
    } else if (kind == kCutout) {
      at::Tensor centres = draw_for(i, at::kLong, {n, 2}, "cutout centres");
      op.centres = centres.data_ptr<int64_t>();
    } else if (kind == kChannelShuffle) {
      at::Tensor permutation = draw_for(i, at::kLong, {n, channels}, "channel permutation");
      const std::string range =
          "channel permutation entries must be in [0, " + std::to_string(channels - 1) + "]";
      if (on_cpu) {
        TORCH_CHECK(permutation.min().item<int64_t>() >= 0 &&
                        permutation.max().item<int64_t>() < channels,
                    range);
      } else {  // checked on the device, without waiting for it
        at::_assert_async(((permutation >= 0) & (permutation < channels)).all(), range);
      }
      op.permutation = permutation.data_ptr<int64_t>();
    } else if (kind == kChannelDrop) {
      op.uniforms = draw_for(i, at::kFloat, {n, channels}, "channel-drop uniforms")
                        .data_ptr<float>();
    } else if (kind == kNoise) {
      op.seed = static_cast<uint64_t>(noise_seeds[i]);
    }
  }
  TORCH_CHECK(affine_ops <= kMaxAffinePerPass, "feature_augment composes at most ",
              kMaxAffinePerPass, " affine ops per call, got ", affine_ops);
  return prepared;
}

}  // namespace sokd
