"""Online softmax statistics shared by the KD kernels.

A row is walked in chunks; each chunk is a (rows x classes) tile in which excluded entries hold
-inf. The running maximum keeps the sums of exponentials in range however long the row is.
"""

import triton
import triton.language as tl


@triton.jit
def merge_chunk(running_max, running_sum, values):
    """Fold a chunk into (max, sum of exp(value - max)) per row.

    Also returns the factor that rescales sums kept against the old maximum and the shift to
    subtract from this chunk's values. A row with nothing seen yet keeps max -inf and sum 0.
    """
    new_max = tl.maximum(running_max, tl.max(values, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp(running_max - shift)
    new_sum = running_sum * rescale + tl.sum(tl.exp(values - shift[:, None]), axis=1)
    return new_max, new_sum, rescale, shift


@triton.jit
def log_sum_exp(running_max, running_sum):
    """log of the sum of exponentials; -inf for a row (or class group) with no entries.

    Only an empty group sums to exactly 0 (any entry adds exp(0) = 1 at the maximum), so a NaN
    sum stays NaN rather than passing for an empty group."""
    empty = running_sum == 0
    safe_sum = tl.where(empty, 1.0, running_sum)
    return tl.where(empty, float("-inf"), running_max + tl.log(safe_sum))
