// CPU kernel of feature_augment: every output element evaluated in one pass through the
// shared augmented_value (csrc/augment_math.h), parallel over output rows.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "augment_plan.h"

namespace sokd::cpu {
namespace {

using at::Tensor;

template <typename scalar_t>
void feature_augment_typed(const Tensor& x, const AugmentPlan& plan, Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = x.size(0), channels = plan.channels;
  const int64_t height = plan.height, width = plan.width;
  const scalar_t* input = x.data_ptr<scalar_t>();
  scalar_t* output = out.data_ptr<scalar_t>();
  const int64_t output_rows = batch * channels * height;

  at::parallel_for(0, output_rows, std::max<int64_t>(1, 4096 / width), [&](int64_t begin,
                                                                          int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = row % height;
      const int64_t c = (row / height) % channels;
      const int64_t n = row / (height * channels);
      const scalar_t* sample = input + n * channels * height * width;
      auto load = [&](int64_t channel, int64_t yy, int64_t xx) {
        return static_cast<acc_t>(sample[(channel * height + yy) * width + xx]);
      };
      for (int64_t x_pos = 0; x_pos < width; ++x_pos) {
        output[row * width + x_pos] =
            static_cast<scalar_t>(augmented_value<acc_t>(plan, n, c, y, x_pos, load));
      }
    }
  });
}

Tensor feature_augment(const Tensor& x, at::IntArrayRef op_ids, const Tensor& values,
                       const c10::List<std::optional<Tensor>>& draws,
                       at::IntArrayRef noise_seeds) {
  PreparedAugment prepared =
      prepare_augment(x, op_ids, values, draws, noise_seeds, c10::DeviceType::CPU);
  Tensor input = x.contiguous();
  Tensor out = at::empty_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "sokd_feature_augment", [&] {
    feature_augment_typed<scalar_t>(input, prepared.plan, out);
  });
  return out;
}

}  // namespace
}  // namespace sokd::cpu

TORCH_LIBRARY_IMPL(sokd, CPU, m) {
  m.impl("feature_augment", &sokd::cpu::feature_augment);
}
