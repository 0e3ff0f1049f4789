// Fused set sampler on the CPU: the driver (contract in set_sampler_params.h). The per-ISA compute
// (GEMM, attention, the forward pass and the sampler loop) lives in set_sampler_impl.h, compiled here
// once per instruction set; the clone is the one the knn kernel dispatches to (cpu_simd_level(), so
// R4T_SIMD and set_cpu_simd apply to both).
//
// Plan of one call:
//   once      modulation vectors (1 + s1, b1, 1 + s2, b2, 1 + s3, b3) for every noise level of the
//             schedule (sigma_mlp and ada depend on sigma only: one small GEMM for all levels), the null
//             condition's cross-attention keys/values per block, the EDM coefficients per level;
//   per team  the condition tokens and their keys/values per block, then every sampler step; a forward
//             pass runs the team's sets (and, with guidance, their null-condition twins) as one batch of
//             rows through each Linear, so the weights are streamed once per pass for all of them;
//   teams     mode 1: one thread per contiguous group of sets (no synchronisation; B >= 2T or T | B);
//             mode 2: one team of all threads (GEMMs split by column passes, one barrier per GEMM;
//             B < 2T, and only while the other runnable tasks leave a core per thread: cores_idle);
//   grounding knn_cpu + ground_cpu on the data-space rows (as ops.ground_sets), after the region.
// All checks and allocations happen before the parallel region; nothing inside it throws.
#include <dirent.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu/set_sampler_layout.h"
#include "cpu/set_sampler_prep.h"
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define R4T_SS_X86 1
#include <immintrin.h>
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vector types only cross always_inline boundaries
#endif

namespace r4t {
namespace ss {

enum class Epi { Store, Add, Gelu };

struct Lin {  // a packed nn.Linear (see LinearLayout)
  const float* w = nullptr;
  const float* b = nullptr;
  int64_t K = 0, N = 0, np = 0;
  // precision bf16 (Bf16Weights): the panels as bf16 pairs for the AVX512-BF16 tiles, or (without them)
  // w holds bf16-rounded weights and round_a rounds A's rows to bf16 values.
  const uint16_t* wb = nullptr;
  bool round_a = false;
};

// float32 -> bfloat16, round to nearest even (NaN stays NaN), as vcvtneps2bf16 and torch's .to(bfloat16).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_round(float f) {
  const uint32_t u = static_cast<uint32_t>(to_bf16(f)) << 16;
  float o;
  std::memcpy(&o, &u, sizeof o);
  return o;
}

struct BlockW {
  Lin qkv, proj, q_x, kv_c, proj_c, mlp0, mlp3;
  const float* ln2_w = nullptr;
  const float* ln2_b = nullptr;
};

struct Model {
  int64_t L = 0, d = 0, cond_dim = 0, hidden = 0, heads = 0, mlp = 0, cond_tokens = 0;
  Lin inp, sig0, sig2, ada, cond_proj, out;
  const float* freqs = nullptr;
  const float* null_cond = nullptr;
  std::vector<BlockW> blocks;
};

struct Run {  // one call, read-only inside the region
  const Model* model = nullptr;
  const SampleSetsParams* params = nullptr;
  int G = 1;      // forwards per set and evaluation: 2 with guidance (conditional + null token)
  float w = 0.f;  // guidance weight
  const float* mods = nullptr;     // (n_sigmas, 6h)
  const float* null_kv = nullptr;  // (layers, cond_tokens, 2h)
  std::vector<float> c_in, c_skip, c_out;  // per level
};

// Barrier of a team: spins briefly, then yields the core (a descheduled team mate -- the 2-core machine
// is often shared -- gets to run instead of being waited for through a whole time slice).
class SpinBarrier {
 public:
  void wait(int n) {
    if (n <= 1) return;
    const int ph = phase_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      count_.store(0, std::memory_order_relaxed);
      phase_.store(ph + 1, std::memory_order_release);
      return;
    }
    for (int i = 0; phase_.load(std::memory_order_acquire) == ph; ++i) {
      if (i < 2048) {
#if defined(R4T_SS_X86)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<int> phase_{0};
};

struct TeamBuf {  // shared by the threads of a team
  SpinBarrier* bar = nullptr;
  int64_t b0 = 0, nb = 0;
  float *X = nullptr, *QKV = nullptr, *Q = nullptr, *U = nullptr, *F = nullptr, *ctok = nullptr, *ckv = nullptr;
};

struct ThreadBuf {  // private to one thread
  float *Y = nullptr, *A = nullptr, *Xin = nullptr, *S = nullptr;
  float *x = nullptr, *xe = nullptr, *D = nullptr, *Dold = nullptr;
};

struct IsaOps {
  const char* name;
  void (*gemm)(const Lin&, const float*, int64_t, int64_t, float*, int64_t, Epi, int, int);
  void (*run_team)(const Run&, const TeamBuf&, const ThreadBuf&, int, int);
};

}  // namespace ss

namespace {

#if defined(R4T_SS_X86)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define SS_NS ss_v4
#define SS_NAME "x86-64-v4"
#define SS_W 16
#define SS_MRMAX 12
#include "cpu/set_sampler_impl.h"
#undef SS_NS
#undef SS_NAME
#undef SS_W
#undef SS_MRMAX
#undef SS_HAS_BF16
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define SS_NS ss_v3
#define SS_NAME "x86-64-v3"
#define SS_W 8
#define SS_MRMAX 6
#include "cpu/set_sampler_impl.h"
#undef SS_NS
#undef SS_NAME
#undef SS_W
#undef SS_MRMAX
#pragma GCC pop_options
#endif

#define SS_NS ss_base
#define SS_NAME "baseline"
#define SS_W 4
#define SS_MRMAX 6
#include "cpu/set_sampler_impl.h"
#undef SS_NS
#undef SS_NAME
#undef SS_W
#undef SS_MRMAX

using ss::Epi;
using ss::Layout;
using ss::Lin;
using ss::LinearLayout;

// The clone the knn kernel dispatches to (honours R4T_SIMD and set_cpu_simd).
const ss::IsaOps& pick_isa() {
#if defined(R4T_SS_X86)
  const std::string level = cpu_simd_level();
  if (level.rfind("x86-64-v4", 0) == 0) return ss_v4::ops();
  if (level.rfind("x86-64-v3", 0) == 0) return ss_v3::ops();
#endif
  return ss_base::ops();
}

void check_dims(const SetDenoiserDims& D) {
  const int64_t v[] = {D.L, D.d, D.cond_dim, D.hidden, D.layers, D.heads, D.mlp, D.cond_tokens};
  for (int64_t x : v) check(x > 0 && x <= (int64_t(1) << 24), "dims: every size must be in [1, 2^24]");
  check(D.hidden % 2 == 0, "dims: hidden must be even (Fourier features), got " + std::to_string(D.hidden));
  check(D.hidden % D.heads == 0, "dims: hidden (" + std::to_string(D.hidden) + ") must be divisible by heads (" +
                                     std::to_string(D.heads) + ")");
}

Lin bind(const float* base, const LinearLayout& l) {
  Lin r;
  r.w = base + l.w;
  r.b = base + l.b;
  r.K = l.K;
  r.N = l.N;
  r.np = l.np;
  return r;
}

ss::Model bind_model(const SetDenoiserDims& D, const Layout& y, const float* pk) {
  ss::Model m;
  m.L = D.L;
  m.d = D.d;
  m.cond_dim = D.cond_dim;
  m.hidden = D.hidden;
  m.heads = D.heads;
  m.mlp = D.mlp;
  m.cond_tokens = D.cond_tokens;
  m.inp = bind(pk, y.inp);
  m.sig0 = bind(pk, y.sig0);
  m.sig2 = bind(pk, y.sig2);
  m.ada = bind(pk, y.ada);
  m.cond_proj = bind(pk, y.cond_proj);
  m.out = bind(pk, y.out);
  m.freqs = pk + y.freqs;
  m.null_cond = pk + y.null_cond;
  for (const auto& b : y.blocks) {
    ss::BlockW w;
    w.qkv = bind(pk, b.qkv);
    w.proj = bind(pk, b.proj);
    w.q_x = bind(pk, b.q_x);
    w.kv_c = bind(pk, b.kv_c);
    w.proj_c = bind(pk, b.proj_c);
    w.mlp0 = bind(pk, b.mlp0);
    w.mlp3 = bind(pk, b.mlp3);
    w.ln2_w = pk + b.ln2_w;
    w.ln2_b = pk + b.ln2_b;
    m.blocks.push_back(w);
  }
  return m;
}

inline float silu(float x) { return static_cast<float>(static_cast<double>(x) / (1.0 + std::exp(-static_cast<double>(x)))); }

#include "cpu/set_sampler_cores.h"
#include "cpu/set_sampler_bf16.h"

// Bump allocator over one vector (64-byte aligned sub-arrays).
struct Arena {
  std::vector<float> buf;
  int64_t used = 0;
  // Zeroed room for n floats; the storage is kept between calls (reserve reuses it when large enough:
  // a fresh 100 KB+ allocation per call costs page faults, ~60 us at batch 1).
  void reserve(int64_t n) {
    const size_t want = static_cast<size_t>(n + 16);
    if (buf.size() < want) {
      buf.assign(want, 0.f);
    } else {
      std::fill(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(want), 0.f);
    }
    used = 0;
  }
  float* take(int64_t n) {
    float* base = buf.data();
    const uintptr_t a = reinterpret_cast<uintptr_t>(base + used);
    const int64_t pad = static_cast<int64_t>(((64 - a % 64) % 64) / sizeof(float));
    float* p = base + used + pad;
    used += pad + ss::round_up(n, 16);
    return p;
  }
};

constexpr int64_t kChunkSets = 32;  // sets per forward batch of a team (320 rows at L = 10)

int64_t team_floats(const SetDenoiserDims& D, int64_t nb, int G) {
  const int64_t M = nb * G * D.L, h = D.hidden;
  return M * h + M * 3 * h + M * h + M * D.mlp + M * D.d + nb * D.cond_tokens * D.cond_dim +
         D.layers * nb * D.cond_tokens * 2 * h + 8 * 32;
}

int64_t thread_floats(const SetDenoiserDims& D, int64_t nb, int G) {
  const int64_t M = nb * G * D.L, h = D.hidden;
  return 2 * M * h + M * D.d + ss::round_up(std::max(D.L, D.cond_tokens), 16) + 16 + 4 * nb * D.L * D.d + 8 * 32;
}

ss::TeamBuf take_team(Arena& a, const SetDenoiserDims& D, int64_t b0, int64_t nb, int G) {
  const int64_t M = nb * G * D.L, h = D.hidden;
  ss::TeamBuf t;
  t.b0 = b0;
  t.nb = nb;
  t.X = a.take(M * h);
  t.QKV = a.take(M * 3 * h);
  t.Q = a.take(M * h);
  t.U = a.take(M * D.mlp);
  t.F = a.take(M * D.d);
  t.ctok = a.take(nb * D.cond_tokens * D.cond_dim);
  t.ckv = a.take(D.layers * nb * D.cond_tokens * 2 * h);
  return t;
}

ss::ThreadBuf take_thread(Arena& a, const SetDenoiserDims& D, int64_t nb, int G) {
  const int64_t M = nb * G * D.L, h = D.hidden, n = nb * D.L * D.d;
  ss::ThreadBuf t;
  t.Y = a.take(M * h);
  t.A = a.take(M * h);
  t.Xin = a.take(M * D.d);
  t.S = a.take(ss::round_up(std::max(D.L, D.cond_tokens), 16) + 16);
  t.x = a.take(n);
  t.xe = a.take(n);
  t.D = a.take(n);
  t.Dold = a.take(n);
  return t;
}

}  // namespace

bool sampler_bf16_native() { return bf16_native_for(pick_isa()); }

void sampler_linear_cpu(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* b, float* y,
                        int precision) {
  run_linear(x, M, K, w, N, b, y, precision);
}

std::vector<SetDenoiserParamSpec> set_denoiser_param_specs(const SetDenoiserDims& D) {
  check_dims(D);
  const Layout y = ss::make_layout(D);
  std::vector<SetDenoiserParamSpec> out;
  for (const auto& e : ss::pack_entries(D, y)) out.push_back(e.spec);
  return out;
}

int64_t set_denoiser_packed_size(const SetDenoiserDims& D) {
  check_dims(D);
  return ss::make_layout(D).total;
}

void set_denoiser_pack(const SetDenoiserDims& D, const float* const* src, int64_t n_src, float* out,
                       int64_t out_size) {
  check_dims(D);
  const Layout y = ss::make_layout(D);
  const auto entries = ss::pack_entries(D, y);
  check(n_src == static_cast<int64_t>(entries.size()),
        "set_denoiser_pack: expected " + std::to_string(entries.size()) + " parameters, got " + std::to_string(n_src));
  check(out != nullptr && out_size == y.total, "set_denoiser_pack: out must hold " + std::to_string(y.total) +
                                                   " floats, got " + std::to_string(out_size));
  std::fill(out, out + out_size, 0.f);
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    const float* s = src[i];
    check(s != nullptr, "set_denoiser_pack: parameter " + e.spec.name + " is null");
    if (e.lin == nullptr) {
      int64_t numel = 1;
      for (int64_t v : e.spec.shape) numel *= v;
      std::copy(s, s + numel, out + e.raw);
    } else if (e.bias) {
      std::copy(s, s + e.lin->N, out + e.lin->b);
    } else {
      ss::pack_panels(s, *e.lin, out);
    }
  }
}

const char* sample_sets_cpu(const SampleSetsParams& p) {
  const SetDenoiserDims& D = p.dims;
  check_dims(D);
  const Layout y = ss::make_layout(D);
  check(p.packed != nullptr && p.packed_size == y.total,
        "packed: expected " + std::to_string(y.total) + " floats for these dims, got " + std::to_string(p.packed_size));
  const int si = static_cast<int>(p.sampler);
  check(si >= 0 && si <= 4, "sampler: expected 0..4, got " + std::to_string(si));
  check(p.n_sigmas >= 2 && p.sigmas != nullptr, "sigmas: expected at least 2 noise levels");
  for (int64_t i = 0; i < p.n_sigmas; ++i) {
    const double s = p.sigmas[i];
    const bool last = i + 1 == p.n_sigmas;
    check(std::isfinite(s) && (last ? s >= 0 : s > 0), "sigmas: expected finite levels > 0 (the last >= 0)");
    check(i == 0 || s < p.sigmas[i - 1], "sigmas: expected a strictly decreasing schedule");
  }
  check(std::isfinite(p.guidance), "guidance: expected a finite number");
  check(std::isfinite(p.sigma_data) && p.sigma_data > 0, "sigma_data: expected > 0");
  check(p.cond_offset == 0.0 || D.cond_dim == D.d, "cond_offset: needs cond_dim == d");
  check(p.B >= 0, "B: expected >= 0");
  check(p.group >= 1 && p.B % p.group == 0, "group: must divide B");
  const ss::IsaOps& isa = pick_isa();
  if (p.B == 0) return isa.name;
  check(p.cond != nullptr && p.x_init != nullptr && p.out_rows != nullptr, "sample_sets: null input or output");
  const bool needs_noise = p.sampler == SetSampler::EulerMaruyama || (p.sampler == SetSampler::Consistency && p.n_sigmas > 2);
  check(!needs_noise || p.noise != nullptr, "noise: required by this sampler");
  if (p.catalog != nullptr) {
    check(p.N > 0 && p.out_ids != nullptr && p.out_scores != nullptr, "catalog: empty, or null grounding outputs");
  }
  if (p.anchor != nullptr) {
    check(p.catalog != nullptr, "anchor: needs a catalog");
    check(p.anchor_k >= 1 && p.anchor_ids != nullptr && p.anchor_scores != nullptr,
          "anchor_k: expected >= 1 with anchor outputs, got " + std::to_string(p.anchor_k));
  }

  ss::Model m = bind_model(D, y, p.packed);
  check_precision(p.precision);
  std::shared_ptr<const ss::Bf16Weights> w16;
  if (p.precision != 0) {
    const bool native = p.precision == 1 && bf16_native_for(isa);
    w16 = ss::bf16_weights(p, native, [&](ss::Bf16Weights& W) { fill_bf16(W, m, y, p.packed); });
    forward_linears(m, y, [&](ss::Lin& l, const LinearLayout& ll) { use_bf16(l, ll, *w16); });
  }
  const int64_t h = D.hidden, Tk = D.cond_tokens, nl = p.n_sigmas;
  ss::Run R;
  R.model = &m;
  R.params = &p;
  R.G = p.guidance != 0.0 ? 2 : 1;
  R.w = static_cast<float>(p.guidance);

  // Per-schedule constants: from the cache when the caller names its packing (cpu/set_sampler_prep.h).
  const std::shared_ptr<const ss::Prep> prep = ss::schedule_prep(p, R.G, [&](ss::Prep& P) {
    // Per-level EDM coefficients (EDM.coefficients, in double, then float as the Python kernels take
    // them) and modulation vectors.
    P.c_in.assign(static_cast<size_t>(nl), 0.f);
    P.c_skip.assign(static_cast<size_t>(nl), 0.f);
    P.c_out.assign(static_cast<size_t>(nl), 0.f);
    std::vector<float> emb(static_cast<size_t>(nl * h), 0.f), h1(static_cast<size_t>(nl * h)),
        h2(static_cast<size_t>(nl * h));
    P.mods.assign(static_cast<size_t>(nl * 6 * h), 0.f);
    const double sd = p.sigma_data;
    const float two_pi = static_cast<float>(2 * M_PI);
    for (int64_t li = 0; li < nl; ++li) {
      const double s = p.sigmas[li];
      if (!(s > 0)) continue;
      P.c_skip[li] = static_cast<float>(sd * sd / (s * s + sd * sd));
      P.c_out[li] = static_cast<float>(s * sd / std::sqrt(s * s + sd * sd));
      P.c_in[li] = static_cast<float>(1.0 / std::sqrt(s * s + sd * sd));
      const float cn = static_cast<float>(std::log(s) / 4.0);
      for (int64_t j = 0; j < h / 2; ++j) {
        const float f = (cn * m.freqs[j]) * two_pi;
        emb[li * h + j] = static_cast<float>(std::cos(static_cast<double>(f)));
        emb[li * h + h / 2 + j] = static_cast<float>(std::sin(static_cast<double>(f)));
      }
    }
    isa.gemm(m.sig0, emb.data(), h, nl, h1.data(), h, Epi::Store, 0, 1);
    for (auto& v : h1) v = silu(v);
    isa.gemm(m.sig2, h1.data(), h, nl, h2.data(), h, Epi::Store, 0, 1);
    for (auto& v : h2) v = silu(v);  // ada = SiLU -> Linear
    isa.gemm(m.ada, h2.data(), h, nl, P.mods.data(), 6 * h, Epi::Store, 0, 1);
    for (int64_t li = 0; li < nl; ++li) {
      for (int64_t part : {0, 2, 4}) {  // s1, s2, s3 -> 1 + s (as `x * (1 + s) + b`)
        float* s = P.mods.data() + li * 6 * h + part * h;
        for (int64_t j = 0; j < h; ++j) s[j] = 1.f + s[j];
      }
    }
    // The null condition's keys/values: only the guided twins (G = 2) read them; without guidance they
    // are not computed (layers x cond_dim x 2h weights, 3 MB at the CPU preset, streamed on one thread).
    P.null_kv.assign(R.G == 2 ? static_cast<size_t>(D.layers * Tk * 2 * h) : 0, 0.f);
    for (int64_t l = 0; l < (R.G == 2 ? D.layers : 0); ++l) {
      isa.gemm(m.blocks[static_cast<size_t>(l)].kv_c, m.null_cond, D.cond_dim, Tk,
               P.null_kv.data() + l * Tk * 2 * h, 2 * h, Epi::Store, 0, 1);
    }
  });
  R.c_in = prep->c_in;
  R.c_skip = prep->c_skip;
  R.c_out = prep->c_out;
  R.mods = prep->mods.data();
  R.null_kv = R.G == 2 ? prep->null_kv.data() : nullptr;

  // Teams and buffers.
  const int T = std::max(1, max_threads(p.num_threads));
  int mode = p.mode;
  if (mode == 0) mode = (T == 1 || p.B >= 2 * T || p.B % T == 0 || !cores_idle(T)) ? 1 : 2;
  check(mode == 1 || mode == 2, "mode: expected 0, 1 or 2, got " + std::to_string(p.mode));
  const int teams = mode == 1 ? static_cast<int>(std::min<int64_t>(T, p.B)) : 1;
  const int region_threads = mode == 1 ? teams : T;
  // The arenas live on as long as the calling thread (calls from several threads never share them).
  thread_local std::vector<Arena> team_arena, thread_arena;
  if (team_arena.size() < static_cast<size_t>(teams)) team_arena.resize(static_cast<size_t>(teams));
  if (thread_arena.size() < static_cast<size_t>(region_threads)) thread_arena.resize(static_cast<size_t>(region_threads));
  std::vector<ss::TeamBuf> team_buf(static_cast<size_t>(teams));
  std::vector<ss::ThreadBuf> thread_buf(static_cast<size_t>(region_threads));
  ss::SpinBarrier barrier;
  std::vector<int64_t> team_end(static_cast<size_t>(teams));
  for (int t = 0; t < teams; ++t) {  // team t owns sets [b0, b1), run kChunkSets at a time
    const int64_t b0 = p.B * t / teams, b1 = p.B * (t + 1) / teams, nb = std::min(b1 - b0, kChunkSets);
    team_arena[t].reserve(team_floats(D, nb, R.G));
    team_buf[t] = take_team(team_arena[t], D, b0, nb, R.G);
    team_buf[t].bar = &barrier;  // used by mode 2 only (a team of one never waits)
    team_end[t] = b1;
  }
  for (int t = 0; t < region_threads; ++t) {
    const int64_t nb = team_buf[mode == 1 ? t : 0].nb;
    thread_arena[t].reserve(thread_floats(D, nb, R.G));
    thread_buf[t] = take_thread(thread_arena[t], D, nb, R.G);
  }

#if defined(R4T_WITH_OPENMP)
#pragma omp parallel num_threads(region_threads) if (region_threads > 1)
#endif
  {
    const int tid = thread_num(), got = team_size();
    // OpenMP may start fewer threads than asked (OMP_DYNAMIC, thread limits): mode 1 deals the teams
    // round-robin; mode 2 runs the team with the threads it got (the barrier counts them).
    // Chunks of at most kChunkSets sets bound the scratch (and keep a chunk's activations near L2).
    auto run_chunks = [&](int t, const ss::ThreadBuf& tb, int team_tid, int team_size) {
      ss::TeamBuf tm = team_buf[t];
      for (int64_t c0 = tm.b0; c0 < team_end[t]; c0 += kChunkSets) {
        tm.b0 = c0;
        tm.nb = std::min(kChunkSets, team_end[t] - c0);
        isa.run_team(R, tm, tb, team_tid, team_size);
      }
    };
    if (mode == 1) {
      for (int t = tid; t < teams; t += got) run_chunks(t, thread_buf[t], 0, 1);
    } else {
      run_chunks(0, thread_buf[tid], tid, got);
    }
  }

  if (p.catalog != nullptr) {  // ground as ops.ground_sets: knn candidates per row, then greedy per group
    const int64_t rows = p.B * D.L, set_rows = p.group * D.L;
    const int64_t cand = std::min(p.candidates > 0 ? p.candidates : set_rows, p.N);
    // The anchors (one per grounded set) ride in the same knn call: one pass over the catalog.
    const int64_t na = p.anchor != nullptr ? p.B / p.group : 0;
    const int64_t kk = na ? std::max(cand, p.anchor_k) : cand;
    std::vector<float> qall;
    if (na) {
      qall.resize(static_cast<size_t>((rows + na) * D.d));
      std::copy(p.out_rows, p.out_rows + rows * D.d, qall.begin());
      std::copy(p.anchor, p.anchor + na * D.d, qall.begin() + rows * D.d);
    }
    std::vector<float> cs(static_cast<size_t>((rows + na) * kk));
    std::vector<int64_t> ci(static_cast<size_t>((rows + na) * kk));
    KnnParams kp;
    kp.queries = na ? qall.data() : p.out_rows;
    kp.q_stride = D.d;
    kp.catalog = p.catalog;
    kp.c_stride = p.c_stride;
    kp.catalog_dtype = p.catalog_dtype;
    kp.metric = p.metric;
    kp.allowed = p.allowed;
    kp.B = rows + na;
    kp.N = p.N;
    kp.d = D.d;
    kp.k = kk;
    kp.out_scores = cs.data();
    kp.out_ids = ci.data();
    kp.num_threads = p.num_threads;
    kp.coarse = p.coarse;
    kp.coarse_stride = p.coarse_stride;
    kp.coarse_scale = p.coarse_scale;
    knn_cpu(kp);
    for (int64_t a = 0; a < na; ++a) {  // the anchors' results, then the rows' first cand candidates
      const size_t src = static_cast<size_t>((rows + a) * kk);
      std::copy(cs.begin() + src, cs.begin() + src + p.anchor_k, p.anchor_scores + a * p.anchor_k);
      std::copy(ci.begin() + src, ci.begin() + src + p.anchor_k, p.anchor_ids + a * p.anchor_k);
    }
    if (kk != cand) {  // compact in place: row r's first cand entries to r * cand (r * cand <= r * kk)
      for (int64_t r = 0; r < rows; ++r) {
        std::copy(cs.begin() + r * kk, cs.begin() + r * kk + cand, cs.begin() + r * cand);
        std::copy(ci.begin() + r * kk, ci.begin() + r * kk + cand, ci.begin() + r * cand);
      }
    }
    GroundParams gp;
    gp.cand_scores = cs.data();
    gp.cand_ids = ci.data();
    gp.S = p.B / p.group;
    gp.L = set_rows;
    gp.C = cand;
    gp.higher_is_better = p.metric == Metric::IP;
    gp.out_ids = p.out_ids;
    gp.out_scores = p.out_scores;
    gp.num_threads = p.num_threads;
    ground_cpu(gp);
  }
  return isa.name;
}

}  // namespace r4t
