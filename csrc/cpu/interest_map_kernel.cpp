// CPU kernel of interest_map: one image per task (local max, top-k, boxes, count map).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/llvmMathExtras.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "accumulation.h"
#include "interest_math.h"
#include "op_checks.h"

namespace sokd::cpu {
namespace {

using at::Tensor;

// Up to this k, top-k selection keeps a sorted list of k (O(candidates * k) at worst, one
// comparison per candidate in practice); past it, a partial sort of all candidates.
constexpr int64_t kInsertionTopK = 64;

// The local-maximum filter of one heat plane as two 1-D passes (rows, then columns) of the
// window's propagating max: 2 * kernel reads per position instead of kernel^2, in branch-free
// loops that vectorise. Shrinking each loop's range clips the window at the border.
template <typename acc_t, typename scalar_t>
void local_peaks_separable(const scalar_t* __restrict__ plane, int64_t height, int64_t width,
                           int64_t radius, acc_t* __restrict__ row_max,
                           acc_t* __restrict__ peaks) {
  const int64_t size = height * width;
  for (int64_t i = 0; i < size; ++i) row_max[i] = static_cast<acc_t>(plane[i]);
  for (int64_t y = 0; y < height; ++y) {
    const scalar_t* row = plane + y * width;
    acc_t* out = row_max + y * width;
    for (int64_t d = 1; d <= radius && d < width; ++d) {
      for (int64_t x = 0; x + d < width; ++x) {
        out[x] = propagating_max(out[x], static_cast<acc_t>(row[x + d]));
      }
      for (int64_t x = d; x < width; ++x) {
        out[x] = propagating_max(out[x], static_cast<acc_t>(row[x - d]));
      }
    }
  }
  std::copy(row_max, row_max + size, peaks);
  for (int64_t d = 1; d <= radius && d < height; ++d) {
    for (int64_t i = 0; i + d * width < size; ++i) {
      peaks[i] = propagating_max(peaks[i], row_max[i + d * width]);
    }
    for (int64_t i = d * width; i < size; ++i) {
      peaks[i] = propagating_max(peaks[i], row_max[i - d * width]);
    }
  }
  for (int64_t i = 0; i < size; ++i) {
    peaks[i] = peak_value(static_cast<acc_t>(plane[i]), peaks[i]);
  }
}

template <typename scalar_t>
void interest_map_typed(const Tensor& heat, const Tensor& wh, const Tensor& offset, int64_t k,
                        int64_t kernel, Tensor& count, Tensor& boxes, Tensor& scores) {
  using acc_t = acc_type<scalar_t>;
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
  const int64_t work_per_image = candidates * 2 * kernel + k * plane;
  const int64_t grain = std::max<int64_t>(1, kParallelWork / work_per_image);
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> peaks(candidates), row_max(plane);
    std::vector<int64_t> order(k <= kInsertionTopK ? k : candidates);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* image = heat_data + n * candidates;
      for (int64_t c = 0; c < heat_channels; ++c) {
        local_peaks_separable(image + c * plane, height, width, radius, row_max.data(),
                              peaks.data() + c * plane);
      }
      auto ranks_before = [&](int64_t a, int64_t b) {
        return peak_ranks_before(peaks[a], a, peaks[b], b);
      };
      if (k <= kInsertionTopK) {
        // The k best so far, in rank order. Candidates come in index order, so one that does
        // not beat the current k-th's value ranks after it: an ordered compare (false for NaN,
        // which takes the full ranking) rejects most of them, a vector of candidates at a time.
        int64_t kept = 0;
        acc_t kth_value = std::numeric_limits<acc_t>::quiet_NaN();
        auto consider = [&](int64_t i) {
          if (peaks[i] <= kth_value) return;
          if (kept == k && !ranks_before(i, order[k - 1])) return;
          int64_t slot = kept < k ? kept++ : k - 1;
          for (; slot > 0 && ranks_before(i, order[slot - 1]); --slot) {
            order[slot] = order[slot - 1];
          }
          order[slot] = i;
          if (kept == k) kth_value = peaks[order[k - 1]];
        };
        using V = at::vec::Vectorized<acc_t>;
        int64_t i = 0;
        for (; i + V::size() <= candidates; i += V::size()) {
          // Bit l is set where lane l is not <= the k-th value.
          int contenders = (V::loadu(peaks.data() + i) <= V(kth_value)).zero_mask();
          for (; contenders != 0; contenders &= contenders - 1) {
            consider(i + c10::llvm::countTrailingZeros(static_cast<uint32_t>(contenders)));
          }
        }
        for (; i < candidates; ++i) consider(i);
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
        const int64_t x_first = std::max<int64_t>(box[0], 0);
        const int64_t x_last = std::min(box[2], width - 1);
        const int64_t y_last = std::min(box[3], height - 1);
        for (int64_t yy = std::max<int64_t>(box[1], 0); yy <= y_last; ++yy) {
          float* row = image_count + yy * width;
          for (int64_t xx = x_first; xx <= x_last; ++xx) row[xx] += 1.f;
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
