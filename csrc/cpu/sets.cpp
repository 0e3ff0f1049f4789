// Set-level kernels on the CPU: greedy grounding without repeats, and Vendi / mean-cosine statistics.
#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace r4t {

namespace {

// Score a ranks strictly before score b in the greedy order; NaN ranks after every other score (the
// same total order as knn, see cpu/knn_detail.h), so std::sort gets a strict weak ordering.
inline bool score_first(float a, float b, bool hib) {
  if (a != a || b != b) return a == a && b != b;
  return hib ? a > b : a < b;
}

}  // namespace

void ground_cpu(const GroundParams& p) {
  check(p.S >= 0 && p.L > 0 && p.C > 0, "ground: invalid sizes (S=" + std::to_string(p.S) + ", L=" +
                                            std::to_string(p.L) + ", C=" + std::to_string(p.C) + ")");
  check(p.L <= INT32_MAX, "ground: L must fit in int32, got " + std::to_string(p.L));
  const int64_t L = p.L, C = p.C;
  const float worst =
      p.higher_is_better ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  ParallelErrors errors;
#if defined(R4T_WITH_OPENMP)
#pragma omp parallel for num_threads(max_threads(p.num_threads)) schedule(dynamic, 16) if (p.S * L * C > 4096)
#endif
  for (int64_t s = 0; s < p.S; ++s) {
    errors.run([&]() {
      struct Pair {
        float score;
        int32_t row;
        int64_t id;
      };
      std::vector<Pair> pairs;
      pairs.reserve(static_cast<size_t>(L * C));
      const float* sc = p.cand_scores + s * L * C;
      const int64_t* id = p.cand_ids + s * L * C;
      for (int64_t r = 0; r < L; ++r) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t item = id[r * C + c];
          if (item >= 0) pairs.push_back({sc[r * C + c], static_cast<int32_t>(r), item});
        }
      }
      const bool hib = p.higher_is_better;
      std::sort(pairs.begin(), pairs.end(), [hib](const Pair& a, const Pair& b) {
        if (score_first(a.score, b.score, hib)) return true;
        if (score_first(b.score, a.score, hib)) return false;
        if (a.row != b.row) return a.row < b.row;
        return a.id < b.id;
      });
      int64_t* oi = p.out_ids + s * L;
      float* os = p.out_scores + s * L;
      for (int64_t r = 0; r < L; ++r) {
        oi[r] = -1;
        os[r] = worst;
      }
      std::vector<int64_t> used;
      used.reserve(static_cast<size_t>(L));
      int64_t open = L;
      for (const Pair& q : pairs) {
        if (open == 0) break;
        if (oi[q.row] >= 0) continue;
        if (std::find(used.begin(), used.end(), q.id) != used.end()) continue;
        oi[q.row] = q.id;
        os[q.row] = q.score;
        used.push_back(q.id);
        --open;
      }
    });
  }
  errors.rethrow();
}

namespace {

// Eigenvalues of the symmetric n x n matrix a (row-major, destroyed) by cyclic Jacobi rotations.
void jacobi_eigenvalues(std::vector<double>& a, int64_t n, std::vector<double>& out) {
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0.0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i + 1; j < n; ++j) off += a[i * n + j] * a[i * n + j];
    if (off < 1e-22) break;
    for (int64_t pi = 0; pi < n; ++pi) {
      for (int64_t q = pi + 1; q < n; ++q) {
        const double apq = a[pi * n + q];
        if (std::fabs(apq) < 1e-300) continue;
        const double app = a[pi * n + pi], aqq = a[q * n + q];
        const double theta = (aqq - app) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), sn = t * c;
        for (int64_t r = 0; r < n; ++r) {  // columns p, q
          const double arp = a[r * n + pi], arq = a[r * n + q];
          a[r * n + pi] = c * arp - sn * arq;
          a[r * n + q] = sn * arp + c * arq;
        }
        for (int64_t r = 0; r < n; ++r) {  // rows p, q
          const double apr = a[pi * n + r], aqr = a[q * n + r];
          a[pi * n + r] = c * apr - sn * aqr;
          a[q * n + r] = sn * apr + c * aqr;
        }
      }
    }
  }
  out.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[i] = a[i * n + i];
}

}  // namespace

void set_stats_cpu(const SetStatsParams& p) {
  check(p.S >= 0 && p.L > 0 && p.d > 0, "set_stats: invalid sizes");
  const int64_t L = p.L, d = p.d;
  ParallelErrors errors;
#if defined(R4T_WITH_OPENMP)
#pragma omp parallel for num_threads(max_threads(p.num_threads)) \
    schedule(dynamic, 8) if (p.S * L * L * d > 65536)
#endif
  for (int64_t s = 0; s < p.S; ++s) {
    errors.run([&]() {
      int64_t n = L;
      if (p.lengths != nullptr) n = std::max<int64_t>(0, std::min<int64_t>(L, p.lengths[s]));
      if (n == 0) {
        p.out_vendi[s] = 0.f;
        p.out_mean_cos[s] = 0.f;
        return;
      }
      const float* x = p.x + s * L * d;
      std::vector<double> inv(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        double ss = 0.0;
        for (int64_t k = 0; k < d; ++k) ss += static_cast<double>(x[i * d + k]) * x[i * d + k];
        inv[i] = ss > 0.0 ? 1.0 / std::sqrt(ss) : 0.0;
      }
      std::vector<double> K(static_cast<size_t>(n * n));
      double off_sum = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        K[i * n + i] = 1.0;
        for (int64_t j = i + 1; j < n; ++j) {
          double dot = 0.0;
          for (int64_t k = 0; k < d; ++k) dot += static_cast<double>(x[i * d + k]) * x[j * d + k];
          const double c = dot * inv[i] * inv[j];
          K[i * n + j] = K[j * n + i] = c;
          off_sum += 2.0 * c;
        }
      }
      p.out_mean_cos[s] = n > 1 ? static_cast<float>(off_sum / static_cast<double>(n * (n - 1))) : 0.f;
      for (double& v : K) v /= static_cast<double>(n);
      std::vector<double> lam;
      jacobi_eigenvalues(K, n, lam);
      double h = 0.0;
      for (double l : lam)
        if (l > 1e-15) h -= l * std::log(l);
      p.out_vendi[s] = static_cast<float>(std::exp(h));
    });
  }
  errors.rethrow();
}

}  // namespace r4t
