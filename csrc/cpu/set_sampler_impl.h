// One instruction set's body of the fused set sampler. NOT a normal header: set_sampler.cpp includes it
// once per ISA, inside `#pragma GCC target(...)` regions and an anonymous namespace, with
//   SS_NS     namespace of this copy       SS_NAME   the clone's name (as cpu_simd_clones() spells it)
//   SS_W      floats per vector (4, 8, 16) SS_MRMAX  rows per GEMM micro-tile (register budget)
// and the ISA-independent types (ss::Lin, ss::Run, ss::TeamBuf, ss::ThreadBuf, ss::Epi) declared.
//
// GEMM (every nn.Linear): C = epilogue(A · W^T + b) with A row-major (M x K, row stride lda) and W packed
// in 32-column panels (set_sampler_layout.h). A micro-tile is MR rows x 2 vectors of accumulators
// (v4: up to 12 x 32 floats in 24 zmm); per k it loads two vectors of the panel and broadcasts MR
// values of A. Units of work are (row chunk of ~64K floats of A, column pass of 2W columns), dealt
// round-robin to the team's threads; inside a unit the row chunk is cut into balanced micro-tiles of at
// most MRMAX rows. Every output element is one ordered sum over k (FMA), whatever the tiling, so results
// do not depend on the batch size, the team or the thread count. Epilogues: store, add to C (residual),
// GELU (erf form, Abramowitz-Stegun 7.1.26 with a Cephes exp, as ATen's vectorised erf).
//
// Team protocol (see set_sampler.cpp): the threads of a team share X (the residual stream), QKV, Q, U
// and F and split every GEMM by units; the cheap row-wise work (layer norms, attention over the L rows
// and the cond tokens, the sampler's elementwise updates) is computed by every thread of the team into
// its private buffers, so one barrier (TeamBuf::bar, a no-op for a team of one) after each GEMM is the
// only synchronisation (6 per block).

namespace SS_NS {

using ::r4t::ss::Epi;
using ::r4t::ss::kPanel;
using ::r4t::ss::Lin;
using ::r4t::ss::Run;
using ::r4t::ss::TeamBuf;
using ::r4t::ss::ThreadBuf;

constexpr int W = SS_W;
constexpr int MRMAX = SS_MRMAX;
constexpr int PASS = 2 * W;                             // columns of one micro-tile
constexpr int NPASS = static_cast<int>(kPanel) / PASS;  // passes per packed panel
constexpr int64_t kAChunkFloats = 64 * 1024;            // A rows per unit: ~256 KiB (stays in L2)
#include "cpu/simd_vec.h"  // vf, vi, vload, vstore, vload_partial, vsplat, vmax, vmin, hsum

// exp (Cephes expf: range reduction by ln 2 in two parts, degree-5 polynomial; ~1 ulp), inputs clamped
// to [-87.3, 88.4].
R4T_INLINE vf vexp(vf x) {
  const vf hi = vsplat(88.3762626647949f), lo = vsplat(-87.3365447504f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const vf fx = x * 1.44269504088896341f + 0.5f;
  vf t = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);
  t = t > fx ? t - 1.0f : t;  // floor
  const vi n = __builtin_convertvector(t, vi);
  x = x - t * 0.693359375f;
  x = x - t * -2.12194440e-4f;
  const vf z = x * x;
  vf y = vsplat(1.9875691500E-4f);
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * z + x + 1.0f;
  const vi e = (n + 127) << 23;
  return y * (vf)e;  // 2^n (GCC vector casts reinterpret the bits)
}

// erf (Abramowitz-Stegun 7.1.26, |error| <= 1.5e-7) and GELU(x) = x/2 (1 + erf(x / sqrt 2)).
R4T_INLINE vf verf(vf x) {
  const vf a = x < 0.f ? -x : x;
  const vf t = 1.0f / (a * 0.3275911f + 1.0f);
  vf r = t * 1.061405429f + -1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t + -0.284496736f;
  r = r * t + 0.254829592f;
  const vf v = 1.0f - r * t * vexp(-(x * x));
  return x < 0.f ? -v : v;
}
R4T_INLINE vf vgelu(vf x) { return (x * 0.5f) * (1.0f + verf(x * 0.70710678118654752f)); }

R4T_INLINE float dot(const float* a, const float* b, int64_t n) {
  vf acc = {};
  int64_t j = 0;
  for (; j + W <= n; j += W) acc += vload(a + j) * vload(b + j);
  float s = hsum(acc);
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// ------------------------------------------------------------------------------------------ GEMM
// bias, epilogue and store of a micro-tile's MR x 2W accumulators.
template <int MR>
R4T_INLINE void finish_tile(const vf* acc0, const vf* acc1, const float* bias, float* C, int64_t ldc, int ncols,
                            Epi epi) {
  const vf c0 = vload(bias), c1 = vload(bias + W);
  for (int i = 0; i < MR; ++i) {
    vf v0 = acc0[i] + c0, v1 = acc1[i] + c1;
    if (epi == Epi::Gelu) {
      v0 = vgelu(v0);
      v1 = vgelu(v1);
    }
    float* c = C + i * ldc;
    if (ncols == PASS) {
      if (epi == Epi::Add) {
        v0 = vload(c) + v0;
        v1 = vload(c + W) + v1;
      }
      vstore(c, v0);
      vstore(c + W, v1);
    } else {
      float t[PASS];
      vstore(t, v0);
      vstore(t + W, v1);
      for (int j = 0; j < ncols; ++j) c[j] = epi == Epi::Add ? c[j] + t[j] : t[j];
    }
  }
}

template <int MR>
void tile(const float* A, int64_t lda, const float* Bp, int64_t K, const float* bias, float* C, int64_t ldc,
          int ncols, Epi epi) {
  vf acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    // The panel streams from L3 at small batch (each weight is used by few rows): prefetch ~4 KiB ahead.
    __builtin_prefetch(Bp + (k + 32) * kPanel);
    __builtin_prefetch(Bp + (k + 32) * kPanel + 16);
    const vf b0 = vload(Bp + k * kPanel), b1 = vload(Bp + k * kPanel + W);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const float a = A[i * lda + k];  // scalar * vector: a broadcast operand of the FMA
      acc0[i] += a * b0;
      acc1[i] += a * b1;
    }
  }
  finish_tile<MR>(acc0, acc1, bias, C, ldc, ncols, epi);
}

template <int MR>
R4T_INLINE void tile_rows(int64_t mr, const float* A, int64_t lda, const float* Bp, int64_t K, const float* bias,
                          float* C, int64_t ldc, int ncols, Epi epi) {
  if (mr == MR) {
    tile<MR>(A, lda, Bp, K, bias, C, ldc, ncols, epi);
  } else if constexpr (MR > 1) {
    tile_rows<MR - 1>(mr, A, lda, Bp, K, bias, C, ldc, ncols, epi);
  }
}

#if SS_W == 16 && defined(R4T_SS_X86)
#define SS_HAS_BF16 1
// precision bf16 with AVX512-BF16 (Lin::wb): A's rows rounded to bf16 (RNE), the panel's bf16 pairs
// (set_sampler.cpp, Bf16Weights), one vdpbf16ps per pair of k: products of bf16 values are exact in
// float32 and accumulate in float32.
template <int MR>
__attribute__((target("avx512bf16"))) void tile_bf16(const uint16_t* A, int64_t lda, const uint16_t* Bp, int64_t Kp,
                                                     const float* bias, float* C, int64_t ldc, int ncols, Epi epi) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < Kp / 2; ++kk) {
    __builtin_prefetch(Bp + (kk + 16) * 2 * kPanel);
    __builtin_prefetch(Bp + (kk + 16) * 2 * kPanel + 32);
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(Bp + kk * 2 * kPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(Bp + kk * 2 * kPanel + 32);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, A + i * lda + 2 * kk, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc0[i] = _mm512_dpbf16_ps(acc0[i], a, b0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], a, b1);
    }
  }
  vf v0[MR], v1[MR];
  for (int i = 0; i < MR; ++i) {
    v0[i] = (vf)acc0[i];
    v1[i] = (vf)acc1[i];
  }
  finish_tile<MR>(v0, v1, bias, C, ldc, ncols, epi);
}

template <int MR>
__attribute__((target("avx512bf16"))) void tile_rows_bf16(int64_t mr, const uint16_t* A, int64_t lda,
                                                          const uint16_t* Bp, int64_t Kp, const float* bias, float* C,
                                                          int64_t ldc, int ncols, Epi epi) {
  if (mr == MR) {
    tile_bf16<MR>(A, lda, Bp, Kp, bias, C, ldc, ncols, epi);
  } else if constexpr (MR > 1) {
    tile_rows_bf16<MR - 1>(mr, A, lda, Bp, Kp, bias, C, ldc, ncols, epi);
  }
}

// rows x K floats (stride lda) -> rows x Kp bf16 (RNE; the pad column zero).
__attribute__((target("avx512bf16"))) void rows_to_bf16(const float* A, int64_t lda, int64_t rows, int64_t K,
                                                        int64_t Kp, uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = A + r * lda;
    uint16_t* o = out + r * Kp;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(a + k));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k), (__m256i)v);
    }
    for (; k < K; ++k) o[k] = ::r4t::ss::to_bf16(a[k]);
    for (; k < Kp; ++k) o[k] = 0;
  }
}
#endif

// C = epi(A W^T + b) for the rows [0, M) of A (see the header comment). precision bf16: with L.wb the
// AVX512-BF16 tiles on A's rows converted per row chunk; with L.round_a (no AVX512-BF16) A's rows rounded
// to bf16 values per row chunk and the float32 tiles on L.w (bf16-rounded weights): the same products,
// summed in another order.
void gemm(const Lin& L, const float* A, int64_t lda, int64_t M, float* C, int64_t ldc, Epi epi, int tid,
          int nt) {
  if (M <= 0) return;
  const int64_t mc = std::max<int64_t>(MRMAX, kAChunkFloats / std::max<int64_t>(L.K, 1) / MRMAX * MRMAX);
  const int64_t nmc = (M + mc - 1) / mc, npass = L.np * NPASS;
  const int64_t Kp = L.K + (L.K & 1);
  thread_local std::vector<float> rounded;
  thread_local std::vector<uint16_t> halves;
  int64_t have = -1;  // the row chunk converted into the scratch (this call only: A's contents change)
  for (int64_t u = tid; u < nmc * npass; u += nt) {
    const int64_t ci = u / npass, pi = u % npass;
    const int64_t p = pi / NPASS, q = pi % NPASS;
    const int64_t col0 = p * kPanel + q * PASS;
    if (col0 >= L.N) continue;
    const int ncols = static_cast<int>(std::min<int64_t>(PASS, L.N - col0));
    const int64_t r0 = ci * mc, rows = std::min(M, r0 + mc) - r0;
    const int64_t nblk = (rows + MRMAX - 1) / MRMAX;
#if defined(SS_HAS_BF16)
    if (L.wb != nullptr) {
      if (have != ci) {
        if (halves.size() < static_cast<size_t>(rows * Kp)) halves.resize(static_cast<size_t>(rows * Kp));
        rows_to_bf16(A + r0 * lda, lda, rows, L.K, Kp, halves.data());
        have = ci;
      }
      const uint16_t* Bp = L.wb + p * Kp * kPanel;
      int64_t r = 0;
      for (int64_t bi = 0; bi < nblk; ++bi) {
        const int64_t mr = rows / nblk + (bi < rows % nblk ? 1 : 0);
        tile_rows_bf16<MRMAX>(mr, halves.data() + r * Kp, Kp, Bp, Kp, L.b + col0, C + (r0 + r) * ldc + col0, ldc,
                              ncols, epi);
        r += mr;
      }
      continue;
    }
#endif
    const float* a_rows = A + r0 * lda;
    int64_t a_ld = lda;
    if (L.round_a) {
      if (have != ci) {
        if (rounded.size() < static_cast<size_t>(rows * L.K)) rounded.resize(static_cast<size_t>(rows * L.K));
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t k = 0; k < L.K; ++k) rounded[r * L.K + k] = ::r4t::ss::bf16_round(a_rows[r * lda + k]);
        }
        have = ci;
      }
      a_rows = rounded.data();
      a_ld = L.K;
    }
    const float* Bp = L.w + p * L.K * kPanel + q * PASS;
    int64_t r = 0;
    for (int64_t bi = 0; bi < nblk; ++bi) {
      const int64_t mr = rows / nblk + (bi < rows % nblk ? 1 : 0);
      tile_rows<MRMAX>(mr, a_rows + r * a_ld, a_ld, Bp, L.K, L.b + col0, C + (r0 + r) * ldc + col0, ldc, ncols,
                       epi);
      r += mr;
    }
  }
}

// ------------------------------------------------------------------------------------------ rows
// y = LN(x) (no affine, eps 1e-5), then y * scale + shift when scale is given.
void layer_norm(const float* X, int64_t M, int64_t h, float* Y, const float* scale, const float* shift) {
  const float inv_h = 1.f / static_cast<float>(h);
  for (int64_t r = 0; r < M; ++r) {
    const float* x = X + r * h;
    float* y = Y + r * h;
    vf acc = {};
    int64_t j = 0;
    for (; j + W <= h; j += W) acc += vload(x + j);
    float s = hsum(acc);
    for (; j < h; ++j) s += x[j];
    const float mean = s * inv_h;
    acc = vf{};
    for (j = 0; j + W <= h; j += W) {
      const vf c = vload(x + j) - mean;
      acc += c * c;
    }
    s = hsum(acc);
    for (; j < h; ++j) s += (x[j] - mean) * (x[j] - mean);
    const float rstd = 1.f / std::sqrt(s * inv_h + 1e-5f);
    for (j = 0; j < h; ++j) {
      const float v = (x[j] - mean) * rstd;
      y[j] = scale != nullptr ? v * scale[j] + shift[j] : v;
    }
  }
}

// softmax(q k^T * scale) v for nq query rows against nk key rows of one head (hd features).
void attend(const float* Q, int64_t ldq, const float* K, const float* V, int64_t ldkv, int64_t nq, int64_t nk,
            int64_t hd, float scale, float* O, int64_t ldo, float* s) {
  const int64_t nkp = (nk + W - 1) / W * W;
  for (int64_t i = 0; i < nq; ++i) {
    const float* q = Q + i * ldq;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < nk; ++j) {
      s[j] = dot(q, K + j * ldkv, hd) * scale;
      mx = std::max(mx, s[j]);
    }
    for (int64_t j = nk; j < nkp; ++j) s[j] = mx;
    float sum = 0.f;
    for (int64_t j = 0; j < nkp; j += W) vstore(s + j, vexp(vload(s + j) - mx));
    for (int64_t j = 0; j < nk; ++j) sum += s[j];
    const float inv = 1.f / sum;
    float* o = O + i * ldo;
    int64_t e = 0;
    for (; e + W <= hd; e += W) {
      vf acc = {};
      for (int64_t j = 0; j < nk; ++j) acc += s[j] * vload(V + j * ldkv + e);
      vstore(o + e, acc * inv);
    }
    for (; e < hd; ++e) {
      float acc = 0.f;
      for (int64_t j = 0; j < nk; ++j) acc += s[j] * V[j * ldkv + e];
      o[e] = acc * inv;
    }
  }
}

// ------------------------------------------------------------------------------------------ forward
// F = SetDenoiser(xs * c_in; c_noise(level li), cond) for the team's nb sets (and their null-condition
// twins when guided) into T.F: rows [0, nb*L) conditional, [nb*L, 2*nb*L) unconditional.
void forward(const Run& R, const TeamBuf& T, const ThreadBuf& P, const float* xs, int64_t li, int tid, int nt) {
  const auto& m = *R.model;
  const int64_t L = m.L, d = m.d, h = m.hidden, heads = m.heads, hd = h / heads, Tk = m.cond_tokens;
  const int64_t nb = T.nb, nv = nb * R.G, M = nv * L;
  const float cin = R.c_in[static_cast<size_t>(li)];
  for (int64_t v = 0; v < nv; ++v) {
    const float* src = xs + (v % nb) * L * d;
    float* dst = P.Xin + v * L * d;
    for (int64_t e = 0; e < L * d; ++e) dst[e] = src[e] * cin;
  }
  gemm(m.inp, P.Xin, d, M, T.X, h, Epi::Store, tid, nt);
  T.bar->wait(nt);
  const float* mod = R.mods + li * 6 * h;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  for (size_t l = 0; l < m.blocks.size(); ++l) {
    const auto& B = m.blocks[l];
    layer_norm(T.X, M, h, P.Y, mod, mod + h);
    gemm(B.qkv, P.Y, h, M, T.QKV, 3 * h, Epi::Store, tid, nt);
    T.bar->wait(nt);
    for (int64_t v = 0; v < nv; ++v) {
      for (int64_t a = 0; a < heads; ++a) {
        const float* q = T.QKV + v * L * 3 * h + a * hd;
        attend(q, 3 * h, q + h, q + 2 * h, 3 * h, L, L, hd, scale, P.A + v * L * h + a * hd, h, P.S);
      }
    }
    gemm(B.proj, P.A, h, M, T.X, h, Epi::Add, tid, nt);
    T.bar->wait(nt);
    layer_norm(T.X, M, h, P.Y, B.ln2_w, B.ln2_b);
    gemm(B.q_x, P.Y, h, M, T.Q, h, Epi::Store, tid, nt);
    T.bar->wait(nt);
    for (int64_t v = 0; v < nv; ++v) {
      const float* kv = v < nb ? T.ckv + (static_cast<int64_t>(l) * nb + v) * Tk * 2 * h
                               : R.null_kv + static_cast<int64_t>(l) * Tk * 2 * h;
      for (int64_t a = 0; a < heads; ++a) {
        attend(T.Q + v * L * h + a * hd, h, kv + a * hd, kv + h + a * hd, 2 * h, L, Tk, hd, scale,
               P.A + v * L * h + a * hd, h, P.S);
      }
    }
    gemm(B.proj_c, P.A, h, M, T.X, h, Epi::Add, tid, nt);
    T.bar->wait(nt);
    layer_norm(T.X, M, h, P.Y, mod + 2 * h, mod + 3 * h);
    gemm(B.mlp0, P.Y, h, M, T.U, m.mlp, Epi::Gelu, tid, nt);
    T.bar->wait(nt);
    gemm(B.mlp3, T.U, m.mlp, M, T.X, h, Epi::Add, tid, nt);
    T.bar->wait(nt);
  }
  layer_norm(T.X, M, h, P.Y, mod + 4 * h, mod + 5 * h);
  gemm(m.out, P.Y, h, M, T.F, d, Epi::Store, tid, nt);
  T.bar->wait(nt);
}

// D(xs; sigma_li) = c_skip xs + c_out ((1 + w) F_cond - w F_uncond) into Dout (n values).
void denoise(const Run& R, const TeamBuf& T, const ThreadBuf& P, const float* xs, int64_t li, float* Dout, int tid,
             int nt) {
  forward(R, T, P, xs, li, tid, nt);
  const int64_t n = T.nb * R.model->L * R.model->d;
  const float cs = R.c_skip[static_cast<size_t>(li)], co = R.c_out[static_cast<size_t>(li)], w = R.w;
  const float* fc = T.F;
  if (R.G == 2) {
    const float* fu = T.F + n;
    for (int64_t e = 0; e < n; ++e) Dout[e] = cs * xs[e] + co * ((1.f + w) * fc[e] - w * fu[e]);
  } else {
    for (int64_t e = 0; e < n; ++e) Dout[e] = cs * xs[e] + co * fc[e];
  }
}

// The whole sampling of the team's sets (every thread of the team runs this; see the header comment).
void run_team(const Run& R, const TeamBuf& T, const ThreadBuf& P, int tid, int nt) {
  const auto& m = *R.model;
  const auto& p = *R.params;
  const int64_t L = m.L, d = m.d, h = m.hidden, cd = m.cond_dim, Tk = m.cond_tokens, nb = T.nb;
  const int64_t n = nb * L * d;
  // Condition tokens and their cross-attention keys/values, once per call.
  gemm(m.cond_proj, p.cond + T.b0 * cd, cd, nb, T.ctok, Tk * cd, Epi::Store, tid, nt);
  T.bar->wait(nt);
  for (size_t l = 0; l < m.blocks.size(); ++l) {
    gemm(m.blocks[l].kv_c, T.ctok, cd, nb * Tk, T.ckv + static_cast<int64_t>(l) * nb * Tk * 2 * h, 2 * h,
         Epi::Store, tid, nt);
  }
  T.bar->wait(nt);

  float* x = P.x;
  float* xe = P.xe;
  float* D = P.D;
  float* Dold = P.Dold;
  std::memcpy(x, p.x_init + T.b0 * L * d, static_cast<size_t>(n) * sizeof(float));
  const double* sig = p.sigmas;
  const int64_t steps = p.n_sigmas - 1;
  const int64_t noise_step = p.B * L * d;
  double h_last = 0.0;
  bool have_old = false;
  for (int64_t i = 0; i < steps; ++i) {
    const double s = sig[i], sn = sig[i + 1];
    const float sf = static_cast<float>(s), inv_s = 1.f / sf;
    const float* z = p.noise != nullptr ? p.noise + i * noise_step + T.b0 * L * d : nullptr;
    switch (p.sampler) {
      case ::r4t::SetSampler::Euler: {
        denoise(R, T, P, x, i, D, tid, nt);
        const float hf = static_cast<float>(sn - s);
        for (int64_t e = 0; e < n; ++e) x[e] = x[e] + hf * ((x[e] - D[e]) * inv_s);
        break;
      }
      case ::r4t::SetSampler::EulerMaruyama: {
        const double up = std::sqrt(std::max(sn * sn * (s * s - sn * sn) / (s * s), 0.0));
        const double down = std::sqrt(std::max(sn * sn - up * up, 0.0));
        denoise(R, T, P, x, i, D, tid, nt);
        const float hf = static_cast<float>(down - s), ns = static_cast<float>(up);
        for (int64_t e = 0; e < n; ++e) {
          float xn = x[e] + hf * ((x[e] - D[e]) * inv_s);
          if (up > 0) xn += ns * z[e];
          x[e] = xn;
        }
        break;
      }
      case ::r4t::SetSampler::Heun: {
        denoise(R, T, P, x, i, D, tid, nt);
        const float hf = static_cast<float>(sn - s);
        if (sn == 0.0) {
          for (int64_t e = 0; e < n; ++e) x[e] = x[e] + hf * ((x[e] - D[e]) * inv_s);
          break;
        }
        for (int64_t e = 0; e < n; ++e) xe[e] = x[e] + hf * ((x[e] - D[e]) * inv_s);
        denoise(R, T, P, xe, i + 1, Dold, tid, nt);
        const float snf = static_cast<float>(sn), half_h = static_cast<float>((sn - s) * 0.5);
        for (int64_t e = 0; e < n; ++e) x[e] = x[e] + half_h * ((x[e] - D[e]) / sf + (xe[e] - Dold[e]) / snf);
        break;
      }
      case ::r4t::SetSampler::DpmPP2M: {
        denoise(R, T, P, x, i, D, tid, nt);
        if (sn == 0.0) {
          std::swap(x, D);
          break;
        }
        const double hh = std::log(s) - std::log(sn);
        const float a = static_cast<float>(sn / s), b = static_cast<float>(std::expm1(-hh));
        if (!have_old) {
          for (int64_t e = 0; e < n; ++e) x[e] = a * x[e] - b * D[e];
        } else {
          const double r = h_last / hh;
          const float c1 = static_cast<float>(1 + 1 / (2 * r)), c2 = static_cast<float>(1 / (2 * r));
          for (int64_t e = 0; e < n; ++e) x[e] = a * x[e] - b * (c1 * D[e] - c2 * Dold[e]);
        }
        std::swap(D, Dold);
        h_last = hh;
        have_old = true;
        break;
      }
      case ::r4t::SetSampler::Consistency: {
        if (i > 0) {
          const float c = static_cast<float>(std::sqrt(std::max(s * s - p.sigma_min * p.sigma_min, 0.0)));
          for (int64_t e = 0; e < n; ++e) x[e] = x[e] + c * z[e];
        }
        denoise(R, T, P, x, i, D, tid, nt);
        std::swap(x, D);
        break;
      }
    }
  }
  if (tid == 0) {  // data space: x + cond_offset * cond (shift_rows); x itself when the offset is 0
    float* out = p.out_rows + T.b0 * L * d;
    const float a = static_cast<float>(p.cond_offset);
    const bool shift = p.cond_offset != 0.0;
    for (int64_t b = 0; b < nb; ++b) {
      const float* c = p.cond + (T.b0 + b) * cd;
      for (int64_t r = 0; r < L; ++r) {
        for (int64_t j = 0; j < d; ++j) {
          const int64_t e = (b * L + r) * d + j;
          out[e] = shift ? x[e] + a * c[j] : x[e];
        }
      }
    }
  }
}

const ::r4t::ss::IsaOps& ops() {
  static const ::r4t::ss::IsaOps o{SS_NAME, &gemm, &run_team};
  return o;
}

}  // namespace SS_NS
