#pragma once
// Fused feature augmentation (docs/algorithm.md §1), shared by csrc/cpu and csrc/cuda.
//
// Every primitive is linear in the map, up to the additive noise, so an output element is a
// weighted sum of input elements plus noise terms. augmented_value walks the op chain from
// the output back to the input, keeping the sample points (channel, y, x, weight) of the
// current stage: an affine op replaces each point by the 4 bilinear corners it reads (zero
// padding drops those outside the map), cutout and channel drop remove points, channel
// shuffle renames the channel, and noise adds weight * v * eps at the point. Two affine ops
// thus read the first op's bilinear output at the 4 neighbours of the second op's sample
// point: exact composition, with no intermediate map.

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace sokd {

// Primitive ids, in the order of sokd/augment_ops.py.
enum AugmentKind : int {
  kShearX = 0,
  kShearY = 1,
  kTranslateX = 2,
  kTranslateY = 3,
  kRotate = 4,
  kCutout = 5,
  kNoise = 6,
  kChannelShuffle = 7,
  kChannelDrop = 8,
  kNumAugmentKinds = 9,
};

constexpr int kMaxAugmentOps = 8;
// Each affine op multiplies the sample points by 4; two of them give 16.
constexpr int kMaxAffinePerPass = 2;
constexpr int kMaxSamplePoints = 16;

C10_HOST_DEVICE inline bool is_affine(int kind) { return kind >= kShearX && kind <= kRotate; }

struct AugmentOp {
  int kind;
  float value;                 // the mapped magnitude v, float32 as the reference keeps it
  float theta[6];              // affine ops: output -> input, row-major 2 x 3
  const int64_t* centres;      // cutout: N x 2 as (y, x)
  const int64_t* permutation;  // channel_shuffle: N x C
  const float* uniforms;       // channel_drop: N x C
  uint64_t seed;               // noise
};

struct AugmentPlan {
  int num_ops;
  int64_t channels, height, width;
  AugmentOp ops[kMaxAugmentOps];
};

// The 2 x 3 theta of an affine op, computed in float32 as sokd/augment_ops.affine_matrix does.
C10_HOST_DEVICE inline void affine_theta(int kind, float value, float* theta) {
  theta[0] = 1.f; theta[1] = 0.f; theta[2] = 0.f;
  theta[3] = 0.f; theta[4] = 1.f; theta[5] = 0.f;
  if (kind == kShearX) {
    theta[1] = value;
  } else if (kind == kShearY) {
    theta[3] = value;
  } else if (kind == kTranslateX) {
    theta[2] = 2.f * value;
  } else if (kind == kTranslateY) {
    theta[5] = 2.f * value;
  } else if (kind == kRotate) {
    float angle = value * static_cast<float>(M_PI / 180.0);
    float c = ::cosf(angle), s = ::sinf(angle);
    theta[0] = c; theta[1] = s;
    theta[3] = -s; theta[4] = c;
  }
}

// Philox4x32-10 (Salmon et al., SC 2011): a counter-based generator, so an element's noise
// depends only on (seed, element index) and every backend thread can draw it independently.
C10_HOST_DEVICE inline void philox4x32(uint32_t counter[4], uint32_t key0, uint32_t key1) {
  const uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  const uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint64_t product0 = static_cast<uint64_t>(kMul0) * counter[0];
    uint64_t product1 = static_cast<uint64_t>(kMul1) * counter[2];
    uint32_t hi0 = static_cast<uint32_t>(product0 >> 32), lo0 = static_cast<uint32_t>(product0);
    uint32_t hi1 = static_cast<uint32_t>(product1 >> 32), lo1 = static_cast<uint32_t>(product1);
    uint32_t next0 = hi1 ^ counter[1] ^ key0;
    uint32_t next2 = hi0 ^ counter[3] ^ key1;
    counter[0] = next0;
    counter[1] = lo1;
    counter[2] = next2;
    counter[3] = lo0;
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
}

// A standard normal draw for element `index` of the stream `seed` (Box-Muller on two Philox
// words). The transform runs in double so CPU and CUDA round to the same float.
C10_HOST_DEVICE inline double normal_at(uint64_t seed, uint64_t index) {
  uint32_t counter[4] = {static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0u,
                         0u};
  philox4x32(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const double kTwoTo32 = 4294967296.0;
  double u1 = (static_cast<double>(counter[0]) + 1.0) / kTwoTo32;  // in (0, 1]: log is finite
  double u2 = static_cast<double>(counter[1]) / kTwoTo32;
  return ::sqrt(-2.0 * ::log(u1)) * ::cos(2.0 * M_PI * u2);
}

// 32-bit coordinates (prepare_augment checks that C, H and W fit): the kernels keep up to
// three arrays of kMaxSamplePoints of these per element, in the CUDA stack frame.
struct SamplePoint {
  int32_t channel, y, x;
};

// Where an affine op's output pixel (y, x) reads its input, in input pixel coordinates:
// affine_grid's pixel centre in normalised coordinates (align_corners=False), mapped by theta,
// then grid_sample's unnormalisation. False when no bilinear corner lies inside the map
// (which also rejects NaN).
template <typename T>
C10_HOST_DEVICE inline bool affine_source(const AugmentOp& op, int64_t y, int64_t x,
                                          int64_t height, int64_t width, T& ix, T& iy) {
  T xn = (T(2) * static_cast<T>(x) + T(1)) / static_cast<T>(width) - T(1);
  T yn = (T(2) * static_cast<T>(y) + T(1)) / static_cast<T>(height) - T(1);
  T gx = static_cast<T>(op.theta[0]) * xn + static_cast<T>(op.theta[1]) * yn +
         static_cast<T>(op.theta[2]);
  T gy = static_cast<T>(op.theta[3]) * xn + static_cast<T>(op.theta[4]) * yn +
         static_cast<T>(op.theta[5]);
  ix = ((gx + T(1)) * static_cast<T>(width) - T(1)) / T(2);
  iy = ((gy + T(1)) * static_cast<T>(height) - T(1)) / T(2);
  return ix > T(-1) && ix < static_cast<T>(width) && iy > T(-1) && iy < static_cast<T>(height);
}

// Calls emit(y, x, weight) for each bilinear corner of (iy, ix) inside the map (zero padding
// drops the others), in the order north-west, north-east, south-west, south-east.
template <typename T, typename Emit>
C10_HOST_DEVICE inline void bilinear_corners(T ix, T iy, int64_t height, int64_t width,
                                             const Emit& emit) {
  T x_floor = ::floor(ix), y_floor = ::floor(iy);
  int64_t x0 = static_cast<int64_t>(x_floor), y0 = static_cast<int64_t>(y_floor);
  T fx = ix - x_floor, fy = iy - y_floor;
  const T corner_weights[4] = {(T(1) - fx) * (T(1) - fy), fx * (T(1) - fy), (T(1) - fx) * fy,
                               fx * fy};
  for (int corner = 0; corner < 4; ++corner) {
    int64_t xx = x0 + (corner & 1), yy = y0 + (corner >> 1);
    if (xx >= 0 && xx < width && yy >= 0 && yy < height) emit(yy, xx, corner_weights[corner]);
  }
}

// Whether sample n's cutout box covers pixel (y, x); float32 arithmetic as in the reference.
C10_HOST_DEVICE inline bool cutout_covers(const AugmentOp& op, int64_t n, int64_t y, int64_t x,
                                          int64_t height, int64_t width) {
  const float box_h = ::floorf(op.value * static_cast<float>(height));
  const float box_w = ::floorf(op.value * static_cast<float>(width));
  const float top = static_cast<float>(op.centres[2 * n]) - ::floorf(box_h / 2.f);
  const float left = static_cast<float>(op.centres[2 * n + 1]) - ::floorf(box_w / 2.f);
  const float py = static_cast<float>(y), px = static_cast<float>(x);
  return py >= top && py < top + box_h && px >= left && px < left + box_w;
}

// Whether channel drop zeroes channel c of sample n.
C10_HOST_DEVICE inline bool channel_dropped(const AugmentOp& op, int64_t n, int64_t c,
                                            int64_t channels) {
  return op.uniforms[n * channels + c] < op.value;
}

// The augmented value of output element (n, c, y, x), in the accumulation type T, reading the
// input through load(channel, y, x) (sample n's plane).
template <typename T, typename Load>
C10_HOST_DEVICE inline T augmented_value(const AugmentPlan& plan, int64_t n, int64_t c,
                                         int64_t y, int64_t x, const Load& load) {
  SamplePoint points[kMaxSamplePoints];
  T weights[kMaxSamplePoints];
  int count = 1;
  points[0] = SamplePoint{static_cast<int32_t>(c), static_cast<int32_t>(y),
                          static_cast<int32_t>(x)};
  weights[0] = T(1);
  T noise_sum = T(0);
  const int64_t height = plan.height, width = plan.width, channels = plan.channels;

  for (int i = plan.num_ops - 1; i >= 0 && count > 0; --i) {
    const AugmentOp& op = plan.ops[i];
    if (is_affine(op.kind)) {
      SamplePoint source[kMaxSamplePoints];
      T source_weights[kMaxSamplePoints];
      int source_count = count;
      for (int p = 0; p < count; ++p) {
        source[p] = points[p];
        source_weights[p] = weights[p];
      }
      count = 0;
      for (int p = 0; p < source_count; ++p) {
        T ix, iy;
        if (!affine_source(op, source[p].y, source[p].x, height, width, ix, iy)) continue;
        const int64_t channel = source[p].channel;
        const T weight = source_weights[p];
        bilinear_corners(ix, iy, height, width, [&](int64_t yy, int64_t xx, T corner_weight) {
          points[count] = SamplePoint{static_cast<int32_t>(channel), static_cast<int32_t>(yy),
                                      static_cast<int32_t>(xx)};
          weights[count] = weight * corner_weight;
          ++count;
        });
      }
    } else if (op.kind == kCutout) {
      int kept = 0;
      for (int p = 0; p < count; ++p) {
        if (!cutout_covers(op, n, points[p].y, points[p].x, height, width)) {
          points[kept] = points[p];
          weights[kept] = weights[p];
          ++kept;
        }
      }
      count = kept;
    } else if (op.kind == kNoise) {
      const T value = static_cast<T>(op.value);
      for (int p = 0; p < count; ++p) {
        uint64_t index = static_cast<uint64_t>(
            ((n * channels + points[p].channel) * height + points[p].y) * width + points[p].x);
        T eps = static_cast<T>(static_cast<float>(normal_at(op.seed, index)));
        noise_sum += weights[p] * (value * eps);
      }
    } else if (op.kind == kChannelShuffle) {
      for (int p = 0; p < count; ++p) {
        points[p].channel =
            static_cast<int32_t>(op.permutation[n * channels + points[p].channel]);
      }
    } else if (op.kind == kChannelDrop) {
      int kept = 0;
      for (int p = 0; p < count; ++p) {
        if (!channel_dropped(op, n, points[p].channel, channels)) {
          points[kept] = points[p];
          weights[kept] = weights[p];
          ++kept;
        }
      }
      count = kept;
    }
  }

  T total = noise_sum;
  for (int p = 0; p < count; ++p) {
    total += weights[p] * load(points[p].channel, points[p].y, points[p].x);
  }
  return total;
}

}  // namespace sokd

namespace sokd {

// Without noise, every op acts on space alone (affine, cutout) or on channels alone (shuffle,
// drop), so augmented_value factors: out(n, c, y, x) = sum over the spatial taps of (n, y, x)
// of weight * in(n, source_channel(n, c), tap), or 0 when a channel op removed c. The CPU
// kernel computes the taps once per pixel and reuses them for every channel.

// The input taps (plane offset, weight) of output pixel (y, x) of sample n, ignoring channel
// ops. Returns their count.
template <typename T>
C10_HOST_DEVICE inline int spatial_taps(const AugmentPlan& plan, int64_t n, int64_t y,
                                        int64_t x, int64_t* offsets, T* weights) {
  int64_t ys[kMaxSamplePoints], xs[kMaxSamplePoints];
  int count = 1;
  ys[0] = y;
  xs[0] = x;
  weights[0] = T(1);
  const int64_t height = plan.height, width = plan.width;
  for (int i = plan.num_ops - 1; i >= 0 && count > 0; --i) {
    const AugmentOp& op = plan.ops[i];
    if (is_affine(op.kind)) {
      int64_t source_ys[kMaxSamplePoints], source_xs[kMaxSamplePoints];
      T source_weights[kMaxSamplePoints];
      const int source_count = count;
      for (int p = 0; p < count; ++p) {
        source_ys[p] = ys[p];
        source_xs[p] = xs[p];
        source_weights[p] = weights[p];
      }
      count = 0;
      for (int p = 0; p < source_count; ++p) {
        T ix, iy;
        if (!affine_source(op, source_ys[p], source_xs[p], height, width, ix, iy)) continue;
        const T weight = source_weights[p];
        bilinear_corners(ix, iy, height, width, [&](int64_t yy, int64_t xx, T corner_weight) {
          ys[count] = yy;
          xs[count] = xx;
          weights[count] = weight * corner_weight;
          ++count;
        });
      }
    } else if (op.kind == kCutout) {
      int kept = 0;
      for (int p = 0; p < count; ++p) {
        if (!cutout_covers(op, n, ys[p], xs[p], height, width)) {
          ys[kept] = ys[p];
          xs[kept] = xs[p];
          weights[kept] = weights[p];
          ++kept;
        }
      }
      count = kept;
    }
  }
  // Two affine ops read the 16 corners of 4 nearby points, which mostly share pixels: merge
  // the taps of one pixel so the channel loop reads each input pixel once.
  int merged = 0;
  for (int p = 0; p < count; ++p) {
    const int64_t offset = ys[p] * width + xs[p];
    int slot = 0;
    while (slot < merged && offsets[slot] != offset) ++slot;
    if (slot == merged) {
      offsets[merged] = offset;
      weights[merged] = weights[p];
      ++merged;
    } else {
      weights[slot] += weights[p];
    }
  }
  return merged;
}

// The input channel that output channel c of sample n reads after the channel ops, or -1
// when channel drop zeroes it.
C10_HOST_DEVICE inline int64_t source_channel(const AugmentPlan& plan, int64_t n, int64_t c) {
  for (int i = plan.num_ops - 1; i >= 0; --i) {
    const AugmentOp& op = plan.ops[i];
    if (op.kind == kChannelShuffle) {
      c = op.permutation[n * plan.channels + c];
    } else if (op.kind == kChannelDrop && channel_dropped(op, n, c, plan.channels)) {
      return -1;
    }
  }
  return c;
}

C10_HOST_DEVICE inline bool has_op(const AugmentPlan& plan, int kind) {
  for (int i = 0; i < plan.num_ops; ++i) {
    if (plan.ops[i].kind == kind) return true;
  }
  return false;
}

}  // namespace sokd
