// The multi-LoRA kernels of csrc/include/pllm/lora.cuh compiled for the CPU emulator (pllm/emu_runtime.h), so CI
// (no GPU) runs the device code itself: indices, masks, the cp.async pipelines, the reduction trees. Compiled by the
// host C++ compiler (setup.py: csrc/*.cpp) with -ffp-contract=off; fmaf and the fp16/bf16 conversions are IEEE-exact on
// the host as on the GPU, so emulated results are the device's bits.
#define PLLM_EMULATE 1
#define PLLM_LORA_DEFINE_LAUNCHERS 1
#include "pllm/lora_launch.cuh"
#include "pllm_launchers.h"

#include <ucontext.h>

#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

namespace pllm {
namespace emu_rt {
namespace {

enum State { kRunnable = 0, kWaitBlock = 1, kWaitWarp = 2, kDone = 3 };

struct Copy {
  void* dst;
  const void* src;
  int bytes;
  long group;
};

struct Thread {
  ucontext_t ctx;
  State state = kRunnable;
  std::vector<Copy> pending;
  long open_group = 0;
};

constexpr size_t kStackBytes = 64 * 1024;  // emulated kernels use a few KiB; 512 threads -> 32 MiB kept for reuse

struct Runtime {
  std::vector<Thread> threads;
  std::vector<std::vector<char>> stacks;
  ucontext_t sched;
  int cur = -1;
  dim3 grid{1, 1, 1}, block{1, 1, 1}, bidx{0, 0, 0};
  std::vector<unsigned char> dsmem;
  const std::function<void()>* body = nullptr;
  std::vector<float> warp_vals;
  std::vector<uint32_t> warp_frags;  // mma: 6 packed words (a0..a3, b0, b1) per lane
  std::string error;
};

Runtime* g_rt = nullptr;  // the launch in progress (launches are not re-entrant)

// Emulation modes (pllm_emu_config): cp.async copies land at their wait (catches reads before the wait) or at issue
// (catches a stage refilled while other threads still read it); threads run in index order or in reverse order.
bool g_cp_async_eager = false;
bool g_reverse = false;

void complete(Thread& th, long below_group) {
  std::vector<Copy> keep;
  for (const Copy& c : th.pending) {
    if (c.group < below_group) {
      unsigned char b[16] = {0};
      if (c.bytes > 0) std::memcpy(b, c.src, static_cast<size_t>(c.bytes));
      std::memcpy(c.dst, b, 16);
    } else {
      keep.push_back(c);
    }
  }
  th.pending.swap(keep);
}

void trampoline() {
  Runtime* r = g_rt;
  const int me = r->cur;
  try {
    (*r->body)();
  } catch (const std::exception& e) {
    if (r->error.empty()) r->error = std::string("exception in emulated kernel: ") + e.what();
  } catch (...) {
    if (r->error.empty()) r->error = "unknown exception in emulated kernel";
  }
  Thread& th = r->threads[me];
  complete(th, th.open_group + 1);  // an exiting thread's copies land
  th.state = kDone;
  // returns to r->sched through uc_link
}

void block_wait(State s) {
  Runtime* r = g_rt;
  const int me = r->cur;
  r->threads[me].state = s;
  swapcontext(&r->threads[me].ctx, &r->sched);
}

Runtime& rt() {
  if (g_rt == nullptr) throw std::runtime_error("emu_rt used outside an emulated launch");
  return *g_rt;
}

void run_block(Runtime& r) {
  const int n = static_cast<int>(r.block.x);
  std::fill(r.dsmem.begin(), r.dsmem.end(), static_cast<unsigned char>(0xFF));
  for (int i = 0; i < n; ++i) {
    Thread& th = r.threads[i];
    th.state = kRunnable;
    th.pending.clear();
    th.open_group = 0;
    getcontext(&th.ctx);
    th.ctx.uc_stack.ss_sp = r.stacks[i].data();
    th.ctx.uc_stack.ss_size = r.stacks[i].size();
    th.ctx.uc_link = &r.sched;
    makecontext(&th.ctx, trampoline, 0);
  }
  const int nwarps = n / 32;
  for (;;) {
    bool ran = false;
    for (int ii = 0; ii < n; ++ii) {
      const int i = g_reverse ? n - 1 - ii : ii;
      if (r.threads[i].state != kRunnable) continue;
      r.cur = i;
      swapcontext(&r.sched, &r.threads[i].ctx);
      ran = true;
    }
    if (!r.error.empty()) throw std::runtime_error(r.error);
    int live = 0, at_block = 0;
    bool released = false;
    for (int w = 0; w < nwarps; ++w) {
      int waiting = 0, done = 0;
      for (int l = 0; l < 32; ++l) {
        const State s = r.threads[w * 32 + l].state;
        waiting += s == kWaitWarp;
        done += s == kDone;
      }
      if (waiting == 32) {
        for (int l = 0; l < 32; ++l) r.threads[w * 32 + l].state = kRunnable;
        released = true;
      } else if (waiting > 0 && waiting + done == 32) {
        throw std::runtime_error("emulator: warp shuffle with exited lanes (full-mask shuffle needs all 32 lanes)");
      }
    }
    for (int i = 0; i < n; ++i) {
      live += r.threads[i].state != kDone;
      at_block += r.threads[i].state == kWaitBlock;
    }
    if (live == 0) return;
    if (!released && at_block == live) {
      for (int i = 0; i < n; ++i) {
        if (r.threads[i].state == kWaitBlock) r.threads[i].state = kRunnable;
      }
      released = true;
    }
    if (!ran && !released) {
      throw std::runtime_error("emulator: deadlock (a __syncthreads or shuffle that not every thread reaches)");
    }
  }
}

}  // namespace

int thread_idx() { return rt().cur; }
int block_dim() { return static_cast<int>(rt().block.x); }
int block_idx(int axis) {
  const dim3& b = rt().bidx;
  return static_cast<int>(axis == 0 ? b.x : (axis == 1 ? b.y : b.z));
}
int grid_dim(int axis) {
  const dim3& g = rt().grid;
  return static_cast<int>(axis == 0 ? g.x : (axis == 1 ? g.y : g.z));
}
void sync_block() { block_wait(kWaitBlock); }
float shfl_xor(float v, int mask) {
  Runtime& r = rt();
  const int me = r.cur;
  const int w = me / 32, lane = me % 32;
  if (mask < 0 || mask > 31) throw std::runtime_error("emulator: shuffle mask out of range");
  r.warp_vals[w * 32 + lane] = v;
  block_wait(kWaitWarp);
  const float out = r.warp_vals[w * 32 + (lane ^ mask)];
  block_wait(kWaitWarp);  // nobody overwrites warp_vals before every lane has read
  return out;
}
namespace {
float half_bits_to_float(uint32_t h, bool bf16) {
  h &= 0xFFFFu;
  if (bf16) {
    const uint32_t u = h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw raw;
  raw.x = static_cast<unsigned short>(h);
  return __half2float(__half(raw));
}
}  // namespace

void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, bool bf16) {
  Runtime& r = rt();
  const int me = r.cur;
  const int w = me / 32, lane = me % 32;
  uint32_t* mine = &r.warp_frags[static_cast<size_t>(me) * 6];
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  block_wait(kWaitWarp);
  const uint32_t* frags = &r.warp_frags[static_cast<size_t>(w) * 32 * 6];
  // A[row][k]: lane 4 * (row % 8) + (k % 8) / 2, register (row >= 8) + 2 * (k >= 8), half k % 2.
  // B[k][col]: lane 4 * col + (k % 8) / 2, register (k >= 8), half k % 2. D[row][col]: lane 4 * (row % 8) + col / 2,
  // element 2 * (row >= 8) + col % 2.
  auto a_at = [&](int row, int k) {
    const uint32_t word = frags[(4 * (row % 8) + (k % 8) / 2) * 6 + (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return half_bits_to_float((k % 2) ? (word >> 16) : word, bf16);
  };
  auto b_at = [&](int k, int col) {
    const uint32_t word = frags[(4 * col + (k % 8) / 2) * 6 + 4 + (k >= 8 ? 1 : 0)];
    return half_bits_to_float((k % 2) ? (word >> 16) : word, bf16);
  };
  const int g = lane >> 2, t = lane & 3;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0);
    const int col = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += a_at(row, k) * b_at(k, col);  // exact products (<= 22-bit mantissas)
    out[e] = acc;
  }
  block_wait(kWaitWarp);  // nobody overwrites warp_frags before every lane has read
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

void* dyn_smem() { return rt().dsmem.data(); }
void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
  Runtime& r = rt();
  if (src_bytes < 0 || src_bytes > 16) throw std::runtime_error("emulator: cp.async src size out of [0, 16]");
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0)) {
    throw std::runtime_error("emulator: cp.async 16 needs 16-byte aligned addresses");
  }
  Thread& th = r.threads[r.cur];
  th.pending.push_back(Copy{smem_dst, gmem_src, src_bytes, th.open_group});
  if (g_cp_async_eager) complete(th, th.open_group + 1);
}
void cp_async_commit() {
  Runtime& r = rt();
  r.threads[r.cur].open_group++;
}
void cp_async_wait(int n) {
  Runtime& r = rt();
  Thread& th = r.threads[r.cur];
  complete(th, th.open_group - n);
}

void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  if (g_rt != nullptr) throw std::runtime_error("emulator: nested launch");
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024 || block.x % 32 != 0) {
    throw std::runtime_error("emulator: block must be (32*n, 1, 1) with n <= 32");
  }
  if (smem_bytes > 227 * 1024) throw std::runtime_error("emulator: too much dynamic shared memory");
  static Runtime r;  // stacks are kept between launches
  r.threads.assign(block.x, Thread{});
  while (r.stacks.size() < block.x) r.stacks.emplace_back(kStackBytes);
  r.grid = grid;
  r.block = block;
  r.dsmem.assign(smem_bytes > 0 ? smem_bytes : 16, 0xFF);
  r.body = &body;
  r.warp_vals.assign(block.x, 0.0f);
  r.warp_frags.assign(static_cast<size_t>(block.x) * 6, 0u);
  r.error.clear();
  g_rt = &r;
  try {
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          r.bidx = dim3(x, y, z);
          run_block(r);
        }
      }
    }
  } catch (...) {
    g_rt = nullptr;
    throw;
  }
  g_rt = nullptr;
}

}  // namespace emu_rt
}  // namespace pllm

void pllm_emu_config(bool cp_async_eager, bool reverse_thread_order) {
  pllm::emu_rt::g_cp_async_eager = cp_async_eager;
  pllm::emu_rt::g_reverse = reverse_thread_order;
}

// ---- emulated entry points (pllm_launchers.h) --------------------------------------------------------------------
namespace {
pllm::emu::LaunchEnv emu_env(int num_sms) {
  PLLM_CHECK(num_sms >= 1, "num_sms must be >= 1, got " << num_sms);
  return pllm::emu::LaunchEnv{nullptr, num_sms};
}
}  // namespace

void pllm_lora_shrink_emu(uintptr_t x, uintptr_t lora_a, uintptr_t slot_ranks, uintptr_t token_slots,
                          uintptr_t sorted_pairs, uintptr_t seg_slot, uintptr_t seg_start, uintptr_t seg_len,
                          uintptr_t out, int64_t num_tokens, int64_t h_in, int64_t num_slots, int64_t num_slices,
                          int64_t max_rank, int64_t k, int64_t num_chunks, int64_t chunk, int64_t x_stride0,
                          int64_t a_stride0, int64_t a_stride1, int64_t a_stride2, int dtype, int path, int num_sms) {
  pllm::emu::shrink_entry(x, lora_a, slot_ranks, token_slots, sorted_pairs, seg_slot, seg_start, seg_len, out,
                          num_tokens, h_in, num_slots, num_slices, max_rank, k, num_chunks, chunk, x_stride0, a_stride0,
                          a_stride1, a_stride2, dtype, path, emu_env(num_sms));
}

void pllm_lora_expand_emu(uintptr_t y, uintptr_t v, uintptr_t lora_b, uintptr_t slot_ranks, uintptr_t slot_scales,
                          uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs, uintptr_t seg_slot,
                          uintptr_t seg_start, uintptr_t seg_len, int64_t num_tokens, int64_t num_slots,
                          int64_t max_rank, int64_t k, int64_t num_chunks, int64_t chunk,
                          const std::vector<int64_t>& slice_sizes, int64_t y_stride0, int64_t b_stride0,
                          int64_t b_stride1, int dtype, int path, int num_sms) {
  pllm::emu::expand_entry(y, v, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs, seg_slot,
                          seg_start, seg_len, num_tokens, num_slots, max_rank, k, num_chunks, chunk, slice_sizes,
                          y_stride0, b_stride0, b_stride1, dtype, path, emu_env(num_sms));
}

void pllm_lora_apply_emu(uintptr_t y, uintptr_t x, uintptr_t lora_a, uintptr_t lora_b, uintptr_t slot_ranks,
                         uintptr_t slot_scales, uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs,
                         uintptr_t seg_slot, uintptr_t seg_start, uintptr_t seg_len, uintptr_t v_scratch,
                         int64_t num_tokens, int64_t h_in, int64_t num_slots, int64_t num_slices, int64_t max_rank,
                         int64_t k, int64_t num_chunks, int64_t chunk, const std::vector<int64_t>& slice_sizes,
                         int64_t x_stride0, int64_t a_stride0, int64_t a_stride1, int64_t a_stride2,
                         int64_t y_stride0, int64_t b_stride0, int64_t b_stride1, int dtype, int path, int num_sms) {
  pllm::emu::apply_entry(y, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights, sorted_pairs,
                         seg_slot, seg_start, seg_len, v_scratch, num_tokens, h_in, num_slots, num_slices, max_rank, k,
                         num_chunks, chunk, slice_sizes, x_stride0, a_stride0, a_stride1, a_stride2, y_stride0,
                         b_stride0, b_stride1, dtype, path, emu_env(num_sms));
}

void pllm_lora_apply_sliced_emu(const std::vector<uintptr_t>& ys, const std::vector<int64_t>& y_strides, uintptr_t x,
                             uintptr_t lora_a, uintptr_t lora_b, uintptr_t slot_ranks, uintptr_t slot_scales,
                             uintptr_t token_slots, uintptr_t token_weights, uintptr_t sorted_pairs, uintptr_t seg_slot,
                             uintptr_t seg_start, uintptr_t seg_len, uintptr_t v_scratch, int64_t num_tokens,
                             int64_t h_in, int64_t num_slots, int64_t num_slices, int64_t max_rank, int64_t k,
                             int64_t num_chunks, int64_t chunk, const std::vector<int64_t>& slice_sizes,
                             int64_t x_stride0, int64_t a_stride0, int64_t a_stride1, int64_t a_stride2,
                             int64_t b_stride0, int64_t b_stride1, int dtype, int path, int num_sms) {
  pllm::emu::apply_sliced_entry(ys, y_strides, x, lora_a, lora_b, slot_ranks, slot_scales, token_slots, token_weights,
                               sorted_pairs, seg_slot, seg_start, seg_len, v_scratch, num_tokens, h_in, num_slots,
                               num_slices, max_rank, k, num_chunks, chunk, slice_sizes, x_stride0, a_stride0,
                               a_stride1, a_stride2, b_stride0, b_stride1, dtype, path, emu_env(num_sms));
}
