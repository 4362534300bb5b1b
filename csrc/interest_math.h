#pragma once
// Peak ordering and box decoding of interest_map (docs/algorithm.md §4), shared by csrc/cpu and
// csrc/cuda so both pick the same peaks and the same boxes as the reference.

#include <c10/macros/Macros.h>

#include <cstdint>

namespace sokd {

// True when peak (a_value, a_index) ranks before (b_value, b_index): higher value first, ties
// to the lower flat index. NaN ranks above everything, as in torch.sort, which keeps the order
// a strict weak ordering for any input.
template <typename T>
C10_HOST_DEVICE inline bool peak_ranks_before(T a_value, int64_t a_index, T b_value,
                                              int64_t b_index) {
  bool a_nan = a_value != a_value, b_nan = b_value != b_value;
  if (a_nan || b_nan) {
    if (a_nan && b_nan) return a_index < b_index;
    return a_nan;
  }
  if (a_value != b_value) return a_value > b_value;
  return a_index < b_index;
}

// max(a, b) that returns NaN when either is NaN, written as a select so that loops over it
// vectorise without branches.
template <typename T>
C10_HOST_DEVICE inline T propagating_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// The local-maximum filter's value at one position, given the propagating max of its window:
// the heat value where it equals that max, else 0. A NaN anywhere in the window (the centre
// included) makes the max NaN and the position no peak.
template <typename T>
C10_HOST_DEVICE inline T peak_value(T centre, T window_max) {
  return window_max == centre ? centre : T(0);
}

// Local-maximum filter at (y, x): the kernel x kernel window is clipped at the border, as
// max_pool2d's -inf padding does.
template <typename T, typename scalar_t>
C10_HOST_DEVICE inline T local_peak(const scalar_t* plane, int64_t height, int64_t width,
                                    int64_t y, int64_t x, int64_t radius) {
  T centre = static_cast<T>(plane[y * width + x]);
  int64_t y0 = y - radius < 0 ? 0 : y - radius;
  int64_t y1 = y + radius >= height ? height - 1 : y + radius;
  int64_t x0 = x - radius < 0 ? 0 : x - radius;
  int64_t x1 = x + radius >= width ? width - 1 : x + radius;
  T window_max = centre;
  for (int64_t yy = y0; yy <= y1; ++yy) {
    for (int64_t xx = x0; xx <= x1; ++xx) {
      window_max = propagating_max(window_max, static_cast<T>(plane[yy * width + xx]));
    }
  }
  return peak_value(centre, window_max);
}

// trunc(clamp(v, low, high)) as an integer. NaN maps to `empty`, a bound that leaves the box
// covering nothing.
template <typename T>
C10_HOST_DEVICE inline int64_t clamp_trunc(T value, T low, T high, int64_t empty) {
  if (value != value) return empty;
  T clamped = value < low ? low : (value > high ? high : value);
  return static_cast<int64_t>(clamped);
}

// Inclusive box (x1, y1, x2, y2) of the peak at (y, x) with centre offset and size wh, all in
// the accumulation type T. The clamps past the map (to W and -1) keep huge values convertible
// without changing which positions the box covers.
template <typename T>
C10_HOST_DEVICE inline void decode_box(int64_t y, int64_t x, T offset_x, T offset_y, T box_w,
                                       T box_h, int64_t height, int64_t width, int64_t* box) {
  T cx = static_cast<T>(x) + offset_x;
  T cy = static_cast<T>(y) + offset_y;
  T half_w = box_w / T(2);
  T half_h = box_h / T(2);
  box[0] = clamp_trunc<T>(cx - half_w, T(0), static_cast<T>(width), width);
  box[1] = clamp_trunc<T>(cy - half_h, T(0), static_cast<T>(height), height);
  box[2] = clamp_trunc<T>(cx + half_w, T(-1), static_cast<T>(width - 1), -1);
  box[3] = clamp_trunc<T>(cy + half_h, T(-1), static_cast<T>(height - 1), -1);
}

}  // namespace sokd
