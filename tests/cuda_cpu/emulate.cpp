// The CPU emulation's scheduler (see include/espo_emulate.h): blocks one after another, the threads of a block
// as ucontext fibers that yield at barriers and warp primitives.
#include <dlfcn.h>
#include "espo_emulate.h"

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
// Built with -fsanitize=address (build.py's sanitized variant): tell ASan which stack each fiber runs on.
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define ESPO_EMU_ASAN 1
#endif

#include <algorithm>
#include <random>
#include <string>
#include <vector>

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace espo_emu {
namespace {

enum class State { kRunnable, kBarrier, kWarp, kDone };

struct Thread {
  ucontext_t ctx;
  State state;
  uint3 idx;
  int linear;
  // warp exchange
  uint64_t in, out;
  int arg, width;
  // barrier
  int pred, *barrier_result;
  void* fake_stack;  // ASan's fake stack of the fiber while it is switched out
};

// A warp primitive some lanes wait in. Lanes of divergent branches may wait in several at once (one per primitive
// and mask: a lane joins the pending one it calls, in program order, since it waits in one at a time).
struct Exchange {
  int op;
  unsigned mask;
  unsigned arrived;
};

struct Warp {
  std::vector<Exchange> pending;
  unsigned present;  // lanes that exist in the block
  unsigned done;     // lanes that have returned
};

const char* op_name(int op) {
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                "__ballot_sync", "__any_sync", "__all_sync", "__match_any_sync", "__syncwarp",
                                "__reduce_add_sync", "__reduce_min_sync", "__reduce_max_sync",
                                "__reduce_min_sync (int)", "__reduce_max_sync (int)"};
  return op >= 0 && op < static_cast<int>(sizeof(names) / sizeof(names[0])) ? names[op] : "?";
}

struct Launch {
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  ucontext_t sched;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<int> order;  // thread run order
  const void* sched_bottom = nullptr;  // the scheduler's stack, for ASan
  size_t sched_size = 0;
  int current = -1;
  int barrier_op = kSync, barrier_acc = 0;
  bool failed = false;
};

Launch* g_launch = nullptr;
cudaError_t g_last_error = cudaSuccess;
cudaError_t g_launch_error = cudaSuccess;
std::string g_message;
unsigned long long g_schedule_seed = 0;
unsigned long long g_switches = 0;
unsigned long long g_vector_loads = 0;
struct Buffer {
  uintptr_t begin, end;
};
std::vector<Buffer> g_buffers;

size_t stack_bytes() {
  static size_t bytes = [] {
    const char* env = getenv("ESPO_EMU_STACK_KB");
    const long kb = env != nullptr ? atol(env) : 256;
    return static_cast<size_t>(kb > 16 ? kb : 16) * 1024;
  }();
  return bytes;
}

// One stack per thread of a block, with a guard page below each (an overflow faults instead of corrupting).
struct Stacks {
  char* base = nullptr;
  size_t each = 0, count = 0;
  explicit Stacks(size_t n) : each(stack_bytes() + 4096), count(n) {
    base = static_cast<char*>(mmap(nullptr, each * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                                   -1, 0));
    if (base == MAP_FAILED) {
      base = nullptr;
      return;
    }
    for (size_t i = 0; i < n; ++i) mprotect(base + i * each, 4096, PROT_NONE);
  }
  ~Stacks() {
    if (base != nullptr) munmap(base, each * count);
  }
  char* stack(size_t i) const { return base + i * each + 4096; }
};

void set_indices(const Thread& t) { threadIdx = t.idx; }

// ASan: a fiber starts running (first entry or resumed).
void fiber_entered(Launch& L, Thread& t) {
#ifdef ESPO_EMU_ASAN
  __sanitizer_finish_switch_fiber(t.fake_stack, &L.sched_bottom, &L.sched_size);
#else
  (void)L;
  (void)t;
#endif
}

// Back to the scheduler from the running thread.
void switch_out() {
  Launch& L = *g_launch;
  Thread& t = L.threads[L.current];
#ifdef ESPO_EMU_ASAN
  __sanitizer_start_switch_fiber(t.state == State::kDone ? nullptr : &t.fake_stack, L.sched_bottom, L.sched_size);
#endif
  swapcontext(&t.ctx, &L.sched);
  fiber_entered(L, t);  // resumed: the scheduler has set threadIdx
}

Thread& self() {
  if (g_launch == nullptr || g_launch->current < 0) {
    fprintf(stderr, "espo_emulate: a device function was called outside a kernel launch\n");
    abort();
  }
  return g_launch->threads[g_launch->current];
}

void fiber_main() {
  Launch& L = *g_launch;
  fiber_entered(L, L.threads[L.current]);
  L.body(L.ctx);
  Thread& t = L.threads[L.current];
  t.state = State::kDone;
  Warp& w = L.warps[t.linear / 32];
  const unsigned bit = 1u << (t.linear % 32);
  w.done |= bit;
  for (const Exchange& e : w.pending)
    if ((e.mask & bit) != 0)
      fail(cudaErrorLaunchFailure, "thread %d returned while lanes 0x%08x of its warp wait in %s with mask 0x%08x",
           t.linear, e.arrived, op_name(e.op), e.mask);
  switch_out();
}

void complete_warp(const Warp& w, const Exchange& e, int warp_index) {
  Launch& L = *g_launch;
  Thread* lanes = &L.threads[static_cast<size_t>(warp_index) * 32];
  const unsigned mask = e.mask & w.present;
  uint64_t combined = 0;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const uint64_t v = lanes[l].in;
    switch (e.op) {
      case kBallot: combined |= (v != 0 ? 1ull : 0ull) << l; break;
      case kAny: combined |= v != 0; break;
      case kReduceAdd: combined = static_cast<uint32_t>(combined + v); break;
      default: break;
    }
  }
  bool all = true;
  uint32_t umin = UINT32_MAX, umax = 0;
  int32_t smin = INT32_MAX, smax = INT32_MIN;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const uint64_t v = lanes[l].in;
    all = all && v != 0;
    umin = std::min(umin, static_cast<uint32_t>(v));
    umax = std::max(umax, static_cast<uint32_t>(v));
    smin = std::min(smin, static_cast<int32_t>(static_cast<uint32_t>(v)));
    smax = std::max(smax, static_cast<int32_t>(static_cast<uint32_t>(v)));
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Thread& t = lanes[l];
    const int width = t.width;
    const int seg = l & ~(width - 1);
    int src = l;
    switch (e.op) {
      case kShflIdx: src = seg + (t.arg & (width - 1)); break;
      case kShflUp: src = (l - seg) >= t.arg ? l - t.arg : l; break;
      case kShflDown: src = (l - seg) + t.arg < width ? l + t.arg : l; break;
      case kShflXor: src = l ^ t.arg; src = src < seg + width ? src : l; break;
      default: break;
    }
    switch (e.op) {
      case kShflIdx:
      case kShflUp:
      case kShflDown:
      case kShflXor:
        if (!(mask >> src & 1u))
          fail(cudaErrorLaunchFailure, "lane %d of warp %d reads lane %d in %s, which is not in the mask 0x%08x", l,
               warp_index, src, op_name(e.op), e.mask);
        t.out = lanes[src].in;
        break;
      case kBallot: t.out = combined; break;
      case kAny: t.out = combined != 0; break;
      case kAll: t.out = all; break;
      case kMatchAny: {
        uint64_t m = 0;
        for (int j = 0; j < 32; ++j)
          if ((mask >> j & 1u) && lanes[j].in == t.in) m |= 1ull << j;
        t.out = m;
        break;
      }
      case kReduceAdd: t.out = combined; break;
      case kReduceMin: t.out = umin; break;
      case kReduceMax: t.out = umax; break;
      case kReduceMinS: t.out = static_cast<uint32_t>(smin); break;
      case kReduceMaxS: t.out = static_cast<uint32_t>(smax); break;
      default: t.out = 0; break;
    }
    t.state = State::kRunnable;
  }
}

std::string describe_waiters(const Launch& L) {
  std::string s;
  char buf[160];
  for (size_t i = 0; i < L.threads.size();) {
    const Thread& t = L.threads[i];
    size_t j = i + 1;
    while (j < L.threads.size() && L.threads[j].state == t.state) ++j;
    const char* what = t.state == State::kBarrier ? "wait at __syncthreads"
                       : t.state == State::kWarp  ? "wait in a warp primitive"
                       : t.state == State::kDone  ? "have returned"
                                                  : "are runnable";
    snprintf(buf, sizeof(buf), "%sthreads %zu-%zu %s", s.empty() ? "" : "; ", i, j - 1, what);
    s += buf;
    i = j;
  }
  for (size_t w = 0; w < L.warps.size(); ++w) {
    for (const Exchange& e : L.warps[w].pending) {
      snprintf(buf, sizeof(buf), "; warp %zu: lanes 0x%08x in %s with mask 0x%08x", w, e.arrived, op_name(e.op),
               e.mask);
      s += buf;
    }
  }
  return s;
}

void set_error(cudaError_t err, const std::string& msg) {
  if (g_launch_error == cudaSuccess) {
    g_launch_error = err;
    g_message = msg;
  }
}

// Runs one block to completion; false on a failure (g_message says what).
bool run_block(Launch& L, const Stacks& stacks) {
  const int n = static_cast<int>(L.threads.size());
  for (int i = 0; i < n; ++i) {
    Thread& t = L.threads[i];
    t.state = State::kRunnable;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = stacks.stack(i);
    t.ctx.uc_stack.ss_size = stack_bytes();
    t.ctx.uc_link = nullptr;
    t.fake_stack = nullptr;
#ifdef ESPO_EMU_ASAN
    __asan_unpoison_memory_region(stacks.stack(i), stack_bytes());  // redzones left by the last fiber on it
#endif
    makecontext(&t.ctx, fiber_main, 0);
  }
  for (Warp& w : L.warps) {
    w.pending.clear();
    w.done = 0;
  }
  for (;;) {
    bool ran = false;
    for (int k = 0; k < n; ++k) {
      const int i = L.order[k];
      Thread& t = L.threads[i];
      if (t.state != State::kRunnable) continue;
      L.current = i;
      set_indices(t);
      ++g_switches;
#ifdef ESPO_EMU_ASAN
      void* fake = nullptr;
      __sanitizer_start_switch_fiber(&fake, stacks.stack(i), stack_bytes());
      swapcontext(&L.sched, &t.ctx);
      __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
      swapcontext(&L.sched, &t.ctx);
#endif
      L.current = -1;
      ran = true;
      if (L.failed) return false;
    }
    if (ran) continue;
    int live = 0, at_barrier = 0;
    for (const Thread& t : L.threads) {
      live += t.state != State::kDone;
      at_barrier += t.state == State::kBarrier;
    }
    if (live == 0) return true;
    if (at_barrier == live) {  // every thread that has not returned is at the barrier: release it
      int result = 0;
      switch (L.barrier_op) {
        case kSyncCount: result = L.barrier_acc; break;
        case kSyncAnd: result = L.barrier_acc == live; break;
        case kSyncOr: result = L.barrier_acc != 0; break;
        default: break;
      }
      for (Thread& t : L.threads)
        if (t.state == State::kBarrier) {
          if (t.barrier_result != nullptr) *t.barrier_result = result;
          t.state = State::kRunnable;
        }
      L.barrier_op = kSync;
      L.barrier_acc = 0;
      continue;
    }
    char head[96];
    snprintf(head, sizeof(head), "deadlock in block (%u, %u, %u): ", blockIdx.x, blockIdx.y, blockIdx.z);
    set_error(cudaErrorLaunchFailure, head + describe_waiters(L));
    return false;
  }
}

}  // namespace

void fail(cudaError_t err, const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  char where[128] = "";
  if (g_launch != nullptr && g_launch->current >= 0)
    snprintf(where, sizeof(where), " (block (%u, %u, %u), thread (%u, %u, %u))", blockIdx.x, blockIdx.y, blockIdx.z,
             threadIdx.x, threadIdx.y, threadIdx.z);
  set_error(err, std::string(buf) + where);
  if (g_launch == nullptr || g_launch->current < 0) {
    fprintf(stderr, "espo_emulate: %s\n", g_message.c_str());
    abort();
  }
  g_launch->failed = true;
  self().state = State::kDone;  // never resumed
  switch_out();
  abort();  // unreachable: a failed launch never switches back to its threads
}

void count_vector_load() { ++g_vector_loads; }

// Whether p lies in this library's own static storage, where every __shared__ variable (a function-static, see
// espo_emulate.h) lives: a shared-memory atomic, not a stray pointer.
bool in_shared_memory(const void* p) {
  Dl_info here{}, there{};
  return dladdr(reinterpret_cast<const void*>(&in_shared_memory), &here) != 0 && dladdr(p, &there) != 0 &&
         there.dli_fbase == here.dli_fbase;
}

void check_read(const void* p, size_t bytes, size_t align, const char* what) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (align > 1 && a % align != 0)
    fail(cudaErrorMisalignedAddress, "%s of %zu bytes at %p: misaligned (needs %zu-byte alignment)", what, bytes, p,
         align);
  if (g_buffers.empty()) return;
  for (const Buffer& b : g_buffers)
    if (a >= b.begin && a + bytes <= b.end) return;
  if (in_shared_memory(p)) return;
  fail(cudaErrorIllegalAddress, "%s of %zu bytes at %p: outside every registered buffer", what, bytes, p);
}

void yield_barrier(int op, int pred, int* result) {
  Launch& L = *g_launch;
  Thread& t = self();
  if (op != kSync) {
    L.barrier_op = op;
    L.barrier_acc += pred;
  }
  t.barrier_result = result;
  t.state = State::kBarrier;
  switch_out();
}

uint64_t warp_exchange(int op, unsigned mask, uint64_t in, int arg, int width) {
  Launch& L = *g_launch;
  Thread& t = self();
  const int warp = t.linear / 32, lane = t.linear % 32;
  Warp& w = L.warps[warp];
  if (!(mask >> lane & 1u)) fail(cudaErrorLaunchFailure, "%s called by lane %d, which is not in its mask 0x%08x",
                                  op_name(op), lane, mask);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(cudaErrorLaunchFailure, "%s with width %d (must be a power of two <= 32)", op_name(op), width);
  const unsigned gone = mask & w.present & w.done;
  if (gone != 0) fail(cudaErrorLaunchFailure, "%s with mask 0x%08x, but lanes 0x%08x have returned", op_name(op), mask,
                      gone);
  size_t k = 0;
  while (k < w.pending.size() && (w.pending[k].op != op || w.pending[k].mask != mask)) ++k;
  if (k == w.pending.size()) w.pending.push_back(Exchange{op, mask, 0u});
  t.in = in;
  t.arg = arg;
  t.width = width;
  w.pending[k].arrived |= 1u << lane;
  if (w.pending[k].arrived == (mask & w.present)) {
    const Exchange e = w.pending[k];
    w.pending.erase(w.pending.begin() + static_cast<long>(k));
    complete_warp(w, e, warp);  // every lane's result is ready; this lane goes on without yielding
  } else {
    t.state = State::kWarp;
    switch_out();
  }
  return t.out;
}

unsigned live_lanes() {
  Thread& t = self();
  const Warp& w = g_launch->warps[t.linear / 32];
  return w.present & ~w.done;
}

cudaError_t launch(dim3 grid, dim3 block, void (*body)(void*), void* ctx) {
  g_launch_error = cudaSuccess;
  g_message.clear();
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (threads == 0 || threads > 1024 || blocks == 0 || block.z > 64 || grid.y > 65535 || grid.z > 65535) {
    char buf[160];
    snprintf(buf, sizeof(buf), "invalid launch configuration: grid (%u, %u, %u), block (%u, %u, %u)", grid.x, grid.y,
             grid.z, block.x, block.y, block.z);
    set_error(cudaErrorInvalidConfiguration, buf);
    g_last_error = g_launch_error;
    return g_launch_error;
  }
  if (g_launch != nullptr) {
    set_error(cudaErrorLaunchFailure, "a kernel launch from inside a kernel (dynamic parallelism) is not emulated");
    g_last_error = g_launch_error;
    return g_launch_error;
  }
  Launch L;
  L.body = body;
  L.ctx = ctx;
  const int n = static_cast<int>(threads);
  L.threads.resize(n);
  L.warps.assign((n + 31) / 32, Warp{});
  for (int i = 0; i < n; ++i) {
    Thread& t = L.threads[i];
    t.linear = i;
    t.idx = {static_cast<unsigned>(i) % block.x, static_cast<unsigned>(i) / block.x % block.y,
             static_cast<unsigned>(i) / (block.x * block.y)};
    L.warps[i / 32].present |= 1u << (i % 32);
  }
  L.order.resize(n);
  for (int i = 0; i < n; ++i) L.order[i] = i;
  std::vector<uint64_t> block_order(blocks);
  for (uint64_t b = 0; b < blocks; ++b) block_order[b] = b;
  if (g_schedule_seed != 0) {
    std::mt19937_64 rng(g_schedule_seed);
    std::shuffle(L.order.begin(), L.order.end(), rng);
    std::shuffle(block_order.begin(), block_order.end(), rng);
  }
  Stacks stacks(static_cast<size_t>(n));
  if (stacks.base == nullptr) {
    set_error(cudaErrorLaunchFailure, "could not map the fiber stacks");
    g_last_error = g_launch_error;
    return g_launch_error;
  }
  gridDim = grid;
  blockDim = block;
  g_launch = &L;
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t b = block_order[k];
    blockIdx = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    if (!run_block(L, stacks)) break;
  }
  g_launch = nullptr;
  g_last_error = g_launch_error;
  return g_launch_error;
}

}  // namespace espo_emu

extern "C" {
void espo_emu_set_schedule(unsigned long long seed) { espo_emu::g_schedule_seed = seed; }
void espo_emu_register_buffer(const void* ptr, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  espo_emu::g_buffers.push_back({a, a + bytes});
}
void espo_emu_clear_buffers(void) { espo_emu::g_buffers.clear(); }
const char* espo_emu_last_error(void) { return espo_emu::g_message.c_str(); }
unsigned long long espo_emu_switches(void) { return espo_emu::g_switches; }
unsigned long long espo_emu_vector_loads(void) { return espo_emu::g_vector_loads; }
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = espo_emu::g_last_error;
  espo_emu::g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return espo_emu::g_last_error; }
const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorMisalignedAddress: return "misaligned address";
  }
  return "unknown error";
}
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  memset(ptr, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* ptr, int value, size_t bytes) { return cudaMemsetAsync(ptr, value, bytes, nullptr); }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
