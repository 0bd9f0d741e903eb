// Fused sample-and-score with the ESPO stop update: the CUDA kernels (no torch headers; see sample.cuh).
//
// Bit-level contract with the Triton backend (kernels/sample.py): the same Philox draw per row, the same
// chunk partition of the vocabulary (chunk_size), and the same exact integer sampling rule, defined in
// espo/ops/reference.py: per element y = fl(x * a) with a = fl(fl(1 / T) * LOG2E_F32), per chunk the integer
// reference r_c = ceil(max y), per element the integer mass q = trunc(fl(ex2(fl(y - r_c)) * 2**S)) with
// ex2.approx.ftz.f32 (what Triton's kernel issues by inline PTX), chunk sums shifted to the row reference
// R = max r_c, target = trunc(double(u) * double(Z)), then the first chunk and the first token whose
// integer cumulative mass exceeds it. Every rounding step is explicit (__fmul_rn, __fsub_rn, __fdiv_rn: no
// FMA contraction) and the sums are integers, so the order of the reductions does not matter and both
// backends draw the same token bit for bit. Rows with top-k/top-p find their exact thresholds by the same
// multi-pivot search on the same order-preserving int32 key (integer masses for top-p) as kernels/filter.py
// (csrc/filter.cuh: two more launches over the grid, then the row's last block), then walk the row.
// The float statistics reuse the per-element ex2 (sums of f = 2**(y - r_c) and f * (y - r_c) per chunk,
// rescaled by powers of two at the merge), so they cost no second exponential.
//
// Performance notes: one block per (row, chunk) streams the logits with 16-byte vector loads (8 bf16 or
// 4 fp32 per load, 2 to 4 loads in flight per thread, all issued before any use), reduces with warp
// shuffles and a few shared-memory words, and per element spends one multiply, one subtract, one MUFU
// ex2, one multiply and float->int64 conversion, a 64-bit add and the float sums. The per-row finish runs
// in the same launch, in the last block of the row to finish (per-row arrival counter), so no second
#pragma once

#include "common.cuh"
#include "filter.cuh"
#include "launch.cuh"
#include "params.cuh"
#include "philox.cuh"

#include <limits.h>
#include <stdint.h>

namespace espo {
namespace {

using detail::FilterWork;
using detail::Params;

// ---------------------------------------------------------------- pass 1: one chunk's statistics

struct Partial {
  float mx, s, d, ymax, sr;
  long long q;
  int idx;
};

template <typename Tag, int CHUNK>
__device__ __forceinline__ Partial chunk_stats(const typename Tag::storage* row, int64_t V, int64_t start, float inv_t,
                                               float two_s, bool need_raw, bool greedy, bool aligned,
                                               Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  float x[C::kLoads][C::kLvec];
  load_chunk<Tag, CHUNK, false>(row, V, start, aligned, x);

  float mx = neg_inf();
#pragma unroll
  for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
    for (int k = 0; k < C::kLvec; ++k) mx = fmaxf(mx, x[j][k]);
  mx = block_reduce<MaxOp, C::kWarps>(mx, sh);
  // max over the chunk of y = fl(x * a): rounding is monotone and a > 0, so it is fl(max x * a).
  const float a = base2_factor(inv_t);
  const float ymax = __fmul_rn(mx, a);
  const float ref = safe_reference(ceilf(ymax));
  const float mr_safe = mx == neg_inf() ? 0.0f : mx;

  float acc[3] = {0.0f, 0.0f, 0.0f};  // sum f, sum f * d (log2 units), sum exp(x - mx)
  long long qsum = 0;
  int idx = kBig;
#pragma unroll
  for (int j = 0; j < C::kLoads; ++j) {
#pragma unroll
    for (int k = 0; k < C::kLvec; ++k) {
      const float xv = x[j][k];
      float d, f;
      qsum += integer_mass(xv, a, ref, two_s, d, f);
      acc[0] += f;
      // f * d, and 0 where f == 0 (d may be -inf there): ex2 flushes below 2**-126, so f > 0 implies
      // d > -127 and the clamp changes nothing else.
      acc[1] = fmaf(f, fmaxf(d, -256.0f), acc[1]);
      // (x - max) first: max * log2(e) alone leaves the float32 range for |max| > 2.36e38
      if (need_raw) acc[2] += ex2((xv - mr_safe) * kLog2e);
      if (greedy) {
        const int le = local_index<Tag, CHUNK, false>(j) + k;
        if (xv == mx && le < CHUNK && start + le < V) idx = min(idx, le);
      }
    }
  }
  block_sum_n<C::kWarps, 3>(acc, sh);
  qsum = block_reduce<SumOp, C::kWarps>(qsum, sh);
  if (greedy) idx = block_reduce<MinOp, C::kWarps>(idx, sh);
  Partial p;
  p.mx = mx;
  p.s = acc[0];
  p.d = acc[1];
  p.ymax = ymax;
  p.sr = acc[2];
  p.q = qsum;
  p.idx = idx == kBig ? kBig : static_cast<int>(start) + idx;
  return p;
}

// ---------------------------------------------------------------- pass 2 helpers: the merged row

// A chunk's raw mass relative to the row's raw max, exp(pm - M) * ps; NaN sums stay NaN so the row is flagged.
__device__ __forceinline__ float chunk_weight(float pm, float ps, float M_safe) {
  const float f = ex2((pm - M_safe) * kLog2e);
  const float w = ps > 0.0f ? ps * f : 0.0f;
  return ps != ps ? ps : w;
}

// R - r_c as a right shift of the chunk's integer sum (63 for a chunk without mass: its sum is 0 anyway).
__device__ __forceinline__ int chunk_shift(float rc, float R) {
  const float s = R - rc;
  return rc > neg_inf() && s < 63.0f ? static_cast<int>(s) : 63;
}

// Integer inverse CDF over the unfiltered row (espo/ops/reference.py steps 2-4): choose the chunk from the
// shifted chunk sums, then re-read that chunk and find the first token whose shifted running sum exceeds
// what is left of the target.
template <typename Tag, int CHUNK>
__device__ int64_t sample_chunked(const Params& p, int64_t row, const typename Tag::storage* rowp, float a, float R,
                                  float u, bool aligned, Shared<Cfg<Tag, CHUNK>::kWarps>& sh) {
  using C = Cfg<Tag, CHUNK>;
  const int nc = p.C;
  const int64_t plane = p.B * static_cast<int64_t>(nc);
  const float* py_row = p.part + row * nc + 3 * plane;
  const long long* pq_row = p.part_q + row * nc;

  long long z = 0;
  for (int c = threadIdx.x; c < nc; c += C::kThreads) z += __ldcg(pq_row + c) >> chunk_shift(ceilf(__ldcg(py_row + c)), R);
  const long long Z = block_reduce<SumOp, C::kWarps>(z, sh);
  const long long target = static_cast<long long>(__dmul_rn(static_cast<double>(u), __ll2double_rn(Z)));

  long long carry = 0;
  int found = kBig;
  for (int base = 0; base < nc; base += C::kThreads) {
    const int c = base + static_cast<int>(threadIdx.x);
    const long long w = c < nc ? __ldcg(pq_row + c) >> chunk_shift(ceilf(__ldcg(py_row + c)), R) : 0;
    long long tile_total;
    const long long ex = block_exclusive_scan_ll<C::kWarps>(w, sh, tile_total);
    const long long cum = carry + ex + w;
    const bool hit = c < nc && cum > target;
    const int first = block_reduce<MinOp, C::kWarps>(hit ? c : kBig, sh);
    if (first != kBig && c == first) sh.pick_excl = cum - w;
    __syncthreads();
    if (first != kBig) {
      found = first;
      break;
    }
    carry += tile_total;
  }
  const int chunk = found != kBig ? found : 0;  // Z == 0 only for an invalid row
  const long long t = found != kBig ? target - sh.pick_excl : 0;
  const float rc = ceilf(__ldcg(py_row + chunk));
  const int shift = chunk_shift(rc, R);
  const float ref = safe_reference(rc);
  __syncthreads();

  // Re-read the chosen chunk (blocked layout: each thread's elements are consecutive) and scan it.
  const int64_t start = static_cast<int64_t>(chunk) * CHUNK;
  float x[C::kLoads][C::kLvec];
  load_chunk<Tag, CHUNK, true>(rowp, p.V, start, aligned, x);
  // Two passes over the thread's elements (the masses are recomputed, bit for bit, rather than kept in
  // registers): the thread's total for the block scan, then its running sums.
  long long tt = 0;
#pragma unroll
  for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
    for (int k = 0; k < C::kLvec; ++k) tt += integer_mass(x[j][k], a, ref, p.two_s);
  long long total;
  long long run = block_exclusive_scan_ll<C::kWarps>(tt, sh, total);
  int my_first = kBig;
  const int base_e = static_cast<int>(threadIdx.x) * C::kEpt;
#pragma unroll
  for (int j = 0; j < C::kLoads; ++j)
#pragma unroll
    for (int k = 0; k < C::kLvec; ++k) {
      run += integer_mass(x[j][k], a, ref, p.two_s);
      if (my_first == kBig && (run >> shift) > t) my_first = base_e + j * C::kLvec + k;
    }
  const int first = block_reduce<MinOp, C::kWarps>(my_first, sh);
  return start + (first != kBig ? first : 0);  // always found for a valid row
}

// ---------------------------------------------------------------- pass 2: the row's finish

// In sample_kernel (SEARCHED false) a row with top-k/top-p is deferred: its round-1 pivots, R and a pending flag
// are written, nothing else, and pivot_round_kernel<2> finishes it (SEARCHED true, round 1's and 2's stats in fs).
template <typename Tag, int CHUNK, bool SEARCHED>
__device__ void finish_row(const Params& p, int64_t row, const typename Tag::storage* rowp, float temp, float inv_t,
                           bool need_raw, bool aligned, Shared<Cfg<Tag, CHUNK>::kWarps>& sh, FilterShared* fs) {
  using C = Cfg<Tag, CHUNK>;
  const int nc = p.C;
  const int64_t plane = p.B * static_cast<int64_t>(nc);
  const float* pmx_row = p.part + row * nc;
  const float* ps_row = pmx_row + plane;
  const float* pd_row = ps_row + plane;
  const float* py_row = pd_row + plane;
  const float* psr_row = py_row + plane;
  const bool greedy = temp == 0.0f;

  // Merge the chunk partials: the row's max logit and max y, then the float sums rescaled to R.
  float Mx = neg_inf(), Y = neg_inf();
  for (int c = threadIdx.x; c < nc; c += C::kThreads) {
    Mx = fmaxf(Mx, __ldcg(pmx_row + c));
    Y = fmaxf(Y, __ldcg(py_row + c));
  }
  Mx = block_reduce<MaxOp, C::kWarps>(Mx, sh);
  Y = block_reduce<MaxOp, C::kWarps>(Y, sh);
  const float R = safe_reference(ceilf(Y));  // = max_c r_c
  const float Y_safe = Y == neg_inf() ? 0.0f : Y;
  const float Mx_safe = Mx == neg_inf() ? 0.0f : Mx;
  float sums[3] = {0.0f, 0.0f, 0.0f};  // S = sum 2**(y - R), D = sum 2**(y - R) * (y - R), Sr
  for (int c = threadIdx.x; c < nc; c += C::kThreads) {
    const float ps = __ldcg(ps_row + c), pd = __ldcg(pd_row + c), rc = ceilf(__ldcg(py_row + c));
    const float e = rc - R;  // an integer <= 0, or -inf
    const float scale = e > -200.0f ? ldexpf(1.0f, static_cast<int>(e)) : 0.0f;
    float w = ps > 0.0f ? ps * scale : 0.0f;
    w = ps != ps ? ps : w;
    sums[0] += w;
    sums[1] += w > 0.0f ? scale * (pd + e * ps) : 0.0f;
    if (need_raw) sums[2] += chunk_weight(__ldcg(pmx_row + c), __ldcg(psr_row + c), Mx_safe);
  }
  block_sum_n<C::kWarps, 3>(sums, sh);
  const float S = sums[0];
  const float log_S = logf(S);
  const float log_s = log_S + (R - Y_safe) * kLn2;  // log of the sum of exp(l - M)
  const float raw_log_s = need_raw ? logf(sums[2]) : log_s;
  const bool valid = S > 0.0f && S < pos_inf() && Mx < pos_inf() && raw_log_s == raw_log_s && raw_log_s < pos_inf();
  if (threadIdx.x == 0) {  // only thread 0 writes the outputs; parked in shared memory, not in registers
    sh.stats[0] = Mx;
    sh.stats[1] = log_s;
    sh.stats[2] = raw_log_s;
    sh.stats[3] = log_S - kLn2 * (sums[1] / S);  // the entropy
  }

  int64_t token = 0;
  if (valid) {
    if (greedy) {
      int first = kBig;
      for (int c = threadIdx.x; c < nc; c += C::kThreads)
        if (__ldcg(pmx_row + c) == Mx) first = min(first, __ldcg(p.part_idx + row * nc + c));
      token = block_reduce<MinOp, C::kWarps>(first, sh);
    } else {
      const float u = philox_uniform(row_value(p.seed, row), row_value(p.offset, row));
      const int64_t k = row_value(p.top_k, row);
      const float top_p = row_value(p.top_p, row);
      const float a = base2_factor(inv_t);
      if ((k > 0 && k < p.V) || top_p < 1.0f) {
        if constexpr (!SEARCHED) {  // p.filtered is set: pivot_round_kernel 1 and 2 search the thresholds
          if (threadIdx.x < kPivots) p.fw.first[row * kPivots + threadIdx.x] = first_pivot(threadIdx.x, Mx, a);
          if (threadIdx.x == 0) {
            p.fw.ref[row] = R;
            p.fw.pending[row] = 1u;
          }
          return;
        } else {
          token = sample_filtered<Tag, CHUNK>(rowp, p.V, nc, a, R, p.two_s, k, top_p, u, aligned, *fs, sh);
        }
      } else {
        token = sample_chunked<Tag, CHUNK>(p, row, rowp, a, R, u, aligned, sh);
      }
    }
    token = token < 0 ? 0 : (token >= p.V ? p.V - 1 : token);  // never reached for a valid row; memory safety
  }
  if (threadIdx.x != 0) return;
  const float Mx0 = sh.stats[0], log_s0 = sh.stats[1], raw_log_s0 = sh.stats[2], entropy = sh.stats[3];
  const float M0 = __fmul_rn(Mx0, inv_t);

  const float nan = nan_f();
  float regret = nan;
  if (!valid) {
    p.out.tokens[row] = -1;
    p.out.logprobs[row] = nan;
    p.out.raw_logprobs[row] = nan;
    p.out.entropy[row] = nan;
    p.out.max_logprob[row] = nan;
    p.out.regret[row] = nan;
  } else {
    const float x_tok = Tag::load1(rowp + token);
    const float l_tok = __fmul_rn(x_tok, inv_t);
    regret = greedy ? 0.0f : M0 - l_tok;
    p.out.tokens[row] = token;
    p.out.logprobs[row] = greedy ? 0.0f : l_tok - M0 - log_s0;
    p.out.raw_logprobs[row] = x_tok - Mx0 - raw_log_s0;
    p.out.entropy[row] = greedy ? 0.0f : entropy;
    p.out.max_logprob[row] = greedy ? 0.0f : -log_s0;
    p.out.regret[row] = regret;
  }
  p.out.valid[row] = valid;

  if (p.has_stop) {
    const StopState& st = p.st;
    const int64_t srow = st.rows != nullptr ? st.rows[row] : row;
    if (srow < 0 || srow >= st.num_rows) {  // espo.sample validates stopper_rows; this only keeps memory safe
      st.stop[row] = false;
      return;
    }
    const bool stopped = st.stopped[srow];
    const bool live = !stopped;
    const bool counted = live && valid;
    const float g = counted ? regret : 0.0f;
    const float mean = st.scalars[0], var = st.scalars[1], beta = st.scalars[2];
    const float armed = st.scalars[3], ready = st.scalars[4];
    const float g_norm = fminf(fmaxf((g - mean) / sqrtf(var + st.delta), -st.clip), st.clip);
    const float z_old = st.z[srow];
    const float z = st.alpha_s * z_old + st.one_minus_alpha_s * g_norm;
    const float given = st.values != nullptr ? st.values[row] : st.value_floor;
    const float value = isfinite(given) ? given : st.value_floor;  // NaN or inf: the floor (espo.ops.reference)
    const int32_t position = st.position[srow];
    const bool stop = counted && armed > 0.0f && ready > 0.0f && static_cast<int64_t>(position) >= st.min_tokens &&
                      z > beta * fmaxf(value, st.value_floor);
    st.z[srow] = counted ? z : z_old;
    st.sum_g[srow] = st.sum_g[srow] + g;
    st.sum_g2[srow] = st.sum_g2[srow] + g * g;
    st.count[srow] = st.count[srow] + (counted ? 1 : 0);
    st.position[srow] = position + (live ? 1 : 0);
    st.stopped[srow] = stopped || stop;
    st.stop[row] = stopped || stop;
  }
}

// ---------------------------------------------------------------- the kernel: block (row, chunk)

template <typename Tag, int CHUNK>
__global__ void __launch_bounds__(Cfg<Tag, CHUNK>::kThreads, Cfg<Tag, CHUNK>::kMinBlocks) sample_kernel(const Params p) {
  using C = Cfg<Tag, CHUNK>;
  __shared__ Shared<C::kWarps> sh;
  const int64_t row = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(p.C));
  const int c = static_cast<int>(blockIdx.x % static_cast<unsigned>(p.C));
  const typename Tag::storage* rowp = static_cast<const typename Tag::storage*>(p.logits) + row * p.stride;
  const bool aligned = (reinterpret_cast<uintptr_t>(rowp) & 15u) == 0;

  const float temp = row_value(p.temperature, row);
  const bool greedy = temp == 0.0f;
  const float inv_t = __fdiv_rn(1.0f, greedy ? 1.0f : temp);
  const bool need_raw = inv_t != 1.0f;  // at temperature 0 or 1 the temperature-1 sums are the same sums

  const Partial part = chunk_stats<Tag, CHUNK>(rowp, p.V, static_cast<int64_t>(c) * CHUNK, inv_t, p.two_s, need_raw,
                                               greedy, aligned, sh);
  if (threadIdx.x == 0) {
    const int64_t plane = p.B * static_cast<int64_t>(p.C);
    float* out = p.part + row * p.C + c;
    out[0] = part.mx;
    out[plane] = part.s;
    out[2 * plane] = part.d;
    out[3 * plane] = part.ymax;
    if (need_raw) out[4 * plane] = part.sr;
    p.part_q[row * p.C + c] = part.q;
    if (greedy) p.part_idx[row * p.C + c] = part.idx;
    __threadfence();  // publish the partials before counting this block as arrived
    const unsigned before = atomicAdd(p.arrived + row, 1u);
    sh.is_last = before == static_cast<unsigned>(p.C - 1);
  }
  __syncthreads();
  if (!sh.is_last) return;
  __threadfence();  // the other blocks' partials are visible now; they are read with ld.cg (L2)
  finish_row<Tag, CHUNK, false>(p, row, rowp, temp, inv_t, need_raw, aligned, sh, nullptr);
}

// ---------------------------------------------------------------- the top-k/top-p search: blocks (row, chunk)

// Round 1 or 2 of the pivot search of the rows sample_kernel deferred (csrc/filter.cuh), one block per chunk: the
// stats of the chunk's tokens at the round's pivots. The row's last block sums its chunks; in round 1 it narrows the
// row's first search and says where round 2 splits, in round 2 it finishes the row (the search, the draw, the
// statistics and the stop update).
template <typename Tag, int CHUNK, int ROUND>
__global__ void __launch_bounds__(Cfg<Tag, CHUNK>::kThreads) pivot_round_kernel(const Params p) {
  using C = Cfg<Tag, CHUNK>;
  __shared__ Shared<C::kWarps> sh;
  __shared__ FilterShared fs;
  const int64_t row = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(p.C));
  const int c = static_cast<int>(blockIdx.x % static_cast<unsigned>(p.C));
  if (p.fw.pending[row] == 0u) return;  // every block of the row returns: nothing to search
  const typename Tag::storage* rowp = static_cast<const typename Tag::storage*>(p.logits) + row * p.stride;
  const bool aligned = (reinterpret_cast<uintptr_t>(rowp) & 15u) == 0;
  const float temp = row_value(p.temperature, row);  // > 0: a greedy row is never deferred
  const float inv_t = __fdiv_rn(1.0f, temp);
  const float a = base2_factor(inv_t);
  const float R = p.fw.ref[row];
  const int t = static_cast<int>(threadIdx.x);
  const long long* next = p.fw.next + row * 3;
  const bool counts = ROUND == 1 || next[2] != 0;
  if (t < kPivots) {
    fs.first[t] = p.fw.first[row * kPivots + t];
    fs.piv[t] = ROUND == 1 ? fs.first[t] : (counts ? even_pivot(t, next[0], next[1]) : 0);
  }
  __syncthreads();
  const int64_t stats_at = row * p.C * kPivots;  // [C, P] of this row
  if (counts) {
    pivot_pass<Tag, CHUNK>(rowp, p.V, c, c + 1, a, R, p.two_s, aligned, fs, sh);
    if (t < kPivots) {
      p.fw.chunk_cnt[stats_at + c * kPivots + t] = fs.stat_cnt[t];
      p.fw.chunk_mass[stats_at + c * kPivots + t] = fs.stat_mass[t];
      __threadfence();  // publish the stats before this block counts as arrived
    }
  }
  __syncthreads();
  if (t == 0) sh.is_last = atomicAdd(p.arrived + ROUND * p.B + row, 1u) == static_cast<unsigned>(p.C - 1);
  __syncthreads();
  if (!sh.is_last) return;
  __threadfence();

  long long* pre = p.fw.pre + row * 2 * kPivots;
  if (t < kPivots) {
    long long cnt = 0, mass = 0;
    if (counts)
      for (int cc = 0; cc < p.C; ++cc) {
        cnt += __ldcg(p.fw.chunk_cnt + stats_at + cc * kPivots + t);
        mass += __ldcg(p.fw.chunk_mass + stats_at + cc * kPivots + t);
      }
    if (ROUND == 1) {
      fs.pre_cnt[t] = pre[t] = cnt;
      fs.pre_mass[t] = pre[kPivots + t] = mass;
    } else {
      fs.pre_cnt[t] = __ldcg(pre + t);
      fs.pre_mass[t] = __ldcg(pre + kPivots + t);
      fs.pre2_cnt[t] = cnt;
      fs.pre2_mass[t] = mass;
    }
  }
  __syncthreads();
  if constexpr (ROUND == 1) {
    Bound lo, hi;
    first_interval(fs, p.V, row_value(p.top_k, row), row_value(p.top_p, row), lo, hi);
    if (t == 0) {
      p.fw.next[row * 3] = lo.key;
      p.fw.next[row * 3 + 1] = hi.key;
      p.fw.next[row * 3 + 2] = lo.cnt - hi.cnt > kCand && hi.key - lo.key > 1;  // threshold_search's pass 2
    }
  } else {
    finish_row<Tag, CHUNK, true>(p, row, rowp, temp, inv_t, inv_t != 1.0f, aligned, sh, &fs);
  }
}

template <typename Tag, int CHUNK>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  using C = Cfg<Tag, CHUNK>;
  const unsigned blocks = static_cast<unsigned>(p.B * static_cast<int64_t>(p.C));
  cudaError_t err = launch_kernel(&sample_kernel<Tag, CHUNK>, blocks, C::kThreads, stream, p);
  if (err != cudaSuccess || !p.filtered) return err;
  err = launch_kernel(&pivot_round_kernel<Tag, CHUNK, 1>, blocks, C::kThreads, stream, p);
  if (err != cudaSuccess) return err;
  return launch_kernel(&pivot_round_kernel<Tag, CHUNK, 2>, blocks, C::kThreads, stream, p);
}

template <typename Tag>
cudaError_t launch_chunk(const Params& p, int64_t chunk, cudaStream_t stream) {
  switch (chunk) {
    case 16: return launch<Tag, 16>(p, stream);
    case 32: return launch<Tag, 32>(p, stream);
    case 64: return launch<Tag, 64>(p, stream);
    case 128: return launch<Tag, 128>(p, stream);
    case 256: return launch<Tag, 256>(p, stream);
    case 512: return launch<Tag, 512>(p, stream);
    case 1024: return launch<Tag, 1024>(p, stream);
    case 2048: return launch<Tag, 2048>(p, stream);
    case 4096: return launch<Tag, 4096>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
}  // namespace
}  // namespace espo
