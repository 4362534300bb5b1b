#include "cpu/outputs.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/Storage.h>
#include <c10/util/strides.h>

#include <atomic>
#include <cstdlib>
#include <iterator>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sokd::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMaxCachedBlocks = 4;
constexpr size_t kMaxCachedBytes = size_t(1) << 30;

void* allocate_block(size_t bytes) {
  void* block = std::aligned_alloc(kHugePage, bytes);
  TORCH_CHECK(block != nullptr, "sokd: out of memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Advice only: a refusal leaves ordinary pages.
  madvise(block, bytes, MADV_HUGEPAGE);
#endif
  return block;
}

class BlockCache {
 public:
  // A cached block of exactly `bytes`, most recently freed first, or a new one.
  void* take(size_t bytes) {
    void* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
        if (it->second == bytes) {
          block = it->first;
          cached_bytes_ -= bytes;
          blocks_.erase(std::next(it).base());
          break;
        }
      }
    }
    if (block == nullptr) block = allocate_block(bytes);
    report(block, static_cast<int64_t>(bytes));
    return block;
  }

  void give_back(void* block, size_t bytes) {
    report(block, -static_cast<int64_t>(bytes));
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks_.emplace_back(block, bytes);
      cached_bytes_ += bytes;
      while (blocks_.size() > kMaxCachedBlocks || cached_bytes_ > kMaxCachedBytes) {
        evicted.push_back(blocks_.front().first);
        cached_bytes_ -= blocks_.front().second;
        blocks_.erase(blocks_.begin());
      }
    }
    for (void* old : evicted) std::free(old);
  }

  int64_t release() {
    std::vector<std::pair<void*, size_t>> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      released.swap(blocks_);
      cached_bytes_ = 0;
    }
    int64_t bytes = 0;
    for (auto& [block, size] : released) {
      std::free(block);
      bytes += static_cast<int64_t>(size);
    }
    return bytes;
  }

 private:
  // Outputs in use show in torch.profiler's memory view, as the allocator's tensors do.
  void report(void* block, int64_t change) {
    const size_t in_use = in_use_bytes_.fetch_add(change) + change;
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(block, change, in_use, in_use, c10::Device(c10::kCPU));
    }
  }

  std::atomic<size_t> in_use_bytes_{0};
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> blocks_;  // oldest first
  size_t cached_bytes_ = 0;
};

// Never destroyed: a tensor freed during interpreter shutdown may still hand its block back.
BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache();
  return *cache;
}

}  // namespace

at::Tensor empty_output_like(const at::Tensor& like) {
  const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
  // Smaller outputs are cheap to fault in and go to the ordinary allocator.
  if (bytes < kLargeOutputBytes) return at::empty_like(like, at::MemoryFormat::Contiguous);
  const size_t block_bytes = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* block = block_cache().take(block_bytes);
  c10::DataPtr data = c10::InefficientStdFunctionContext::makeDataPtr(
      block, [block_bytes](void* data) { block_cache().give_back(data, block_bytes); },
      c10::Device(c10::kCPU));
  // A resizable storage, as every tensor from the ordinary allocator has: resize_ (or an
  // out= of another size) takes new memory from the default CPU allocator and hands this
  // block back to the cache through its deleter.
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(data),
                       c10::GetDefaultCPUAllocator(), /*resizable=*/true);
  return at::empty({0}, like.options())
      .set_(std::move(storage), 0, like.sizes(), c10::contiguous_strides(like.sizes()));
}

int64_t release_cached_outputs() { return block_cache().release(); }

}  // namespace sokd::cpu
