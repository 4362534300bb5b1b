// CPU kernel of interest_map: one image per task (local max, top-k, boxes, count map).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "interest_math.h"
#include "op_checks.h"

namespace sokd::cpu {
namespace {

using at::Tensor;

// Up to this k, top-k selection keeps a sorted list of k (O(candidates * k) at worst, one
// comparison per candidate in practice); past it, a partial sort of all candidates.
constexpr int64_t kInsertionTopK = 64;

template <typename scalar_t>
void interest_map_typed(const Tensor& heat, const Tensor& wh, const Tensor& offset, int64_t k,
                        int64_t kernel, Tensor& count, Tensor& boxes, Tensor& scores) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = heat.size(0), heat_channels = heat.size(1);
  const int64_t height = heat.size(2), width = heat.size(3);
  const int64_t plane = height * width, candidates = heat_channels * plane;
  const int64_t radius = (kernel - 1) / 2;
  const scalar_t* heat_data = heat.data_ptr<scalar_t>();
  const scalar_t* wh_data = wh.data_ptr<scalar_t>();
  const scalar_t* offset_data = offset.data_ptr<scalar_t>();
  float* count_data = count.data_ptr<float>();
  int64_t* box_data = boxes.data_ptr<int64_t>();
  scalar_t* score_data = scores.data_ptr<scalar_t>();

  // Waking a second thread costs more than a small batch of peak decoding (a few hundred
  // microseconds for 64 CIFAR maps): only batches with more work than this run in parallel.
  constexpr int64_t kParallelWork = 1 << 20;
  const int64_t work_per_image = candidates * kernel * kernel + k * plane;
  const int64_t grain = std::max<int64_t>(1, kParallelWork / work_per_image);
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> peaks(candidates);
    std::vector<int64_t> order(k <= kInsertionTopK ? k : candidates);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* image = heat_data + n * candidates;
      for (int64_t c = 0; c < heat_channels; ++c) {
        for (int64_t y = 0; y < height; ++y) {
          for (int64_t x = 0; x < width; ++x) {
            peaks[c * plane + y * width + x] =
                local_peak<acc_t>(image + c * plane, height, width, y, x, radius);
          }
        }
      }
      auto ranks_before = [&](int64_t a, int64_t b) {
        return peak_ranks_before(peaks[a], a, peaks[b], b);
      };
      if (k <= kInsertionTopK) {
        // The k best so far, in rank order: most candidates lose to the current k-th and cost
        // one comparison.
        int64_t kept = 0;
        for (int64_t i = 0; i < candidates; ++i) {
          if (kept == k && !ranks_before(i, order[k - 1])) continue;
          int64_t slot = kept < k ? kept++ : k - 1;
          for (; slot > 0 && ranks_before(i, order[slot - 1]); --slot) {
            order[slot] = order[slot - 1];
          }
          order[slot] = i;
        }
      } else {
        std::iota(order.begin(), order.end(), int64_t(0));
        std::partial_sort(order.begin(), order.begin() + k, order.end(), ranks_before);
      }

      const scalar_t* image_wh = wh_data + n * 2 * plane;
      const scalar_t* image_offset = offset_data + n * 2 * plane;
      float* image_count = count_data + n * plane;
      std::fill(image_count, image_count + plane, 0.f);
      for (int64_t i = 0; i < k; ++i) {
        const int64_t position = order[i] % plane;
        const int64_t y = position / width, x = position % width;
        int64_t* box = box_data + (n * k + i) * 4;
        decode_box<acc_t>(y, x, static_cast<acc_t>(image_offset[position]),
                          static_cast<acc_t>(image_offset[plane + position]),
                          static_cast<acc_t>(image_wh[position]),
                          static_cast<acc_t>(image_wh[plane + position]), height, width, box);
        score_data[n * k + i] = static_cast<scalar_t>(peaks[order[i]]);
        for (int64_t yy = std::max<int64_t>(box[1], 0); yy <= std::min(box[3], height - 1); ++yy) {
          for (int64_t xx = std::max<int64_t>(box[0], 0); xx <= std::min(box[2], width - 1);
               ++xx) {
            image_count[yy * width + xx] += 1.f;
          }
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> interest_map(const Tensor& heat, const Tensor& wh,
                                                const Tensor& offset, int64_t k, int64_t kernel) {
  check_interest_inputs(heat, wh, offset, k, kernel, c10::DeviceType::CPU);
  const int64_t batch = heat.size(0);
  Tensor count = at::empty({batch, heat.size(2), heat.size(3)}, heat.options().dtype(at::kFloat));
  Tensor boxes = at::empty({batch, k, 4}, heat.options().dtype(at::kLong));
  Tensor scores = at::empty({batch, k}, heat.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, heat.scalar_type(),
                                  "sokd_interest_map", [&] {
    interest_map_typed<scalar_t>(heat.contiguous(), wh.contiguous(), offset.contiguous(), k,
                                 kernel, count, boxes, scores);
  });
  return {count, boxes, scores};
}

}  // namespace
}  // namespace sokd::cpu

TORCH_LIBRARY_IMPL(sokd, CPU, m) {
  m.impl("interest_map", &sokd::cpu::interest_map);
}
