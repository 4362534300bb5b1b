// CPU kernel of feature_augment: one pass over the output for the whole op sequence, through
// the shared math of csrc/augment_math.h.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "accumulation.h"
#include "augment_plan.h"
#include "cpu/outputs.h"
#include "cpu/vec_math.h"

namespace sokd::cpu {
namespace {

using at::Tensor;

// Without noise: the taps of each pixel are computed once (once per sample under cutout, the
// only op that moves them between samples) and reused for every channel. A task takes
// `vectors` vectors of channels: their planes are interleaved into a pixel-major tile, so each
// tap is one weight broadcast, then a contiguous load and an FMA per vector of channels.
template <int vectors, typename scalar_t>
void augment_factored(const scalar_t* input, const AugmentPlan& plan, int64_t batch,
                      scalar_t* output) {
  using acc_t = acc_type<scalar_t>;
  using V = at::vec::Vectorized<acc_t>;
  constexpr int64_t kLanes = vectors * V::size();
  const int64_t channels = plan.channels, plane = plan.height * plan.width;
  const int64_t blocks_per_sample = (channels + kLanes - 1) / kLanes;
  const bool taps_per_sample = has_op(plan, kCutout);
  at::parallel_for(0, batch * blocks_per_sample, 1, [&](int64_t begin, int64_t end) {
    // Tap offsets are kept in tile elements (pixel * kLanes).
    std::vector<int64_t> tap_offsets(plane * kMaxSamplePoints);
    std::vector<acc_t> tap_weights(plane * kMaxSamplePoints);
    std::vector<int> tap_counts(plane);
    std::vector<acc_t> tile(plane * kLanes);
    int64_t taps_for = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks_per_sample;
      if (taps_for < 0 || (taps_per_sample && taps_for != n)) {
        for (int64_t p = 0; p < plane; ++p) {
          int64_t* offsets = tap_offsets.data() + p * kMaxSamplePoints;
          tap_counts[p] = spatial_taps<acc_t>(plan, n, p / plan.width, p % plan.width, offsets,
                                              tap_weights.data() + p * kMaxSamplePoints);
          for (int t = 0; t < tap_counts[p]; ++t) offsets[t] *= kLanes;
        }
        taps_for = n;
      }
      const int64_t first = (task % blocks_per_sample) * kLanes;
      const int64_t lanes = std::min(kLanes, channels - first);
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        const int64_t source = lane < lanes ? source_channel(plan, n, first + lane) : -1;
        if (source < 0) {  // a dropped channel, or past the last one
          for (int64_t p = 0; p < plane; ++p) tile[p * kLanes + lane] = acc_t(0);
          continue;
        }
        const scalar_t* in_plane = input + (n * channels + source) * plane;
        for (int64_t p = 0; p < plane; ++p) {
          tile[p * kLanes + lane] = static_cast<acc_t>(in_plane[p]);
        }
      }
      scalar_t* out_block = output + (n * channels + first) * plane;
      for (int64_t p = 0; p < plane; ++p) {
        const int64_t* offsets = tap_offsets.data() + p * kMaxSamplePoints;
        const acc_t* weights = tap_weights.data() + p * kMaxSamplePoints;
        V totals[vectors];
        for (int u = 0; u < vectors; ++u) totals[u] = V(acc_t(0));
        for (int t = 0; t < tap_counts[p]; ++t) {
          const V weight(weights[t]);
          const acc_t* pixel = tile.data() + offsets[t];
          for (int u = 0; u < vectors; ++u) {
            totals[u] = at::vec::fmadd(weight, V::loadu(pixel + u * V::size()), totals[u]);
          }
        }
        acc_t values[kLanes];
        for (int u = 0; u < vectors; ++u) totals[u].store(values + u * V::size());
        for (int64_t lane = 0; lane < lanes; ++lane) {
          out_block[lane * plane + p] = static_cast<scalar_t>(values[lane]);
        }
      }
    }
  });
}

// With noise: every element walks the whole op chain (augmented_value).
template <typename scalar_t>
void augment_per_element(const scalar_t* input, const AugmentPlan& plan, int64_t batch,
                         scalar_t* output) {
  using acc_t = acc_type<scalar_t>;
  const int64_t channels = plan.channels, height = plan.height, width = plan.width;
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
  Tensor out = empty_output_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "sokd_feature_augment", [&] {
    if (has_op(prepared.plan, kNoise)) {
      augment_per_element(input.data_ptr<scalar_t>(), prepared.plan, input.size(0),
                          out.data_ptr<scalar_t>());
    } else {
      // Two vectors of channels share each tap's weight, as long as the tile of a plane
      // stays in the core's L2; bigger planes take one.
      using acc_t = acc_type<scalar_t>;
      constexpr int64_t kTileBytes = 128 << 10;
      const int64_t plane = input.size(2) * input.size(3);
      const int64_t pair_tile_bytes =
          plane * 2 * at::vec::Vectorized<acc_t>::size() * sizeof(acc_t);
      auto* factored = pair_tile_bytes <= kTileBytes ? &augment_factored<2, scalar_t>
                                                     : &augment_factored<1, scalar_t>;
      factored(input.data_ptr<scalar_t>(), prepared.plan, input.size(0),
               out.data_ptr<scalar_t>());
    }
  });
  return out;
}

}  // namespace
}  // namespace sokd::cpu

TORCH_LIBRARY_IMPL(sokd, CPU, m) {
  m.impl("feature_augment", &sokd::cpu::feature_augment);
}
