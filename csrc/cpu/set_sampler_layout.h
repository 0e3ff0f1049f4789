// Layout of the packed SetDenoiser weights (see set_sampler_params.h). The one home of the packing
// order: param_specs() lists every parameter with where it goes; set_denoiser_pack and the kernels
// both read the offsets from make_layout().
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "set_sampler_params.h"

namespace r4t {
namespace ss {

constexpr int64_t kPanel = 32;  // output columns per packed panel (two zmm, four ymm, eight xmm)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// nn.Linear(K -> N): weights at w (np panels of K x kPanel floats: w[p][k][j] = W[p*32 + j][k]),
// bias at b (np * kPanel floats, zero-padded).
struct LinearLayout {
  int64_t K = 0, N = 0, np = 0, w = 0, b = 0;
};

// W (N x K, row-major, as nn.Linear.weight) into l's panels at base + l.w (columns past N zero).
inline void pack_panels(const float* W, const LinearLayout& l, float* base) {
  for (int64_t p = 0; p < l.np; ++p) {
    for (int64_t k = 0; k < l.K; ++k) {
      float* dst = base + l.w + (p * l.K + k) * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t col = p * kPanel + j;
        dst[j] = col < l.N ? W[col * l.K + k] : 0.f;
      }
    }
  }
}

struct BlockLayout {
  LinearLayout qkv, proj, q_x, kv_c, proj_c, mlp0, mlp3;
  int64_t ln2_w = 0, ln2_b = 0;
};

struct Layout {
  LinearLayout inp, sig0, sig2, ada, cond_proj, out;
  int64_t freqs = 0, null_cond = 0;
  std::vector<BlockLayout> blocks;
  int64_t total = 0;
};

inline Layout make_layout(const SetDenoiserDims& D) {
  Layout y;
  int64_t off = 0;
  auto raw = [&](int64_t n) {
    const int64_t o = off;
    off += round_up(n, 16);  // keep every array 64-byte aligned
    return o;
  };
  auto lin = [&](int64_t K, int64_t N) {
    LinearLayout l;
    l.K = K;
    l.N = N;
    l.np = (N + kPanel - 1) / kPanel;
    l.w = raw(l.np * K * kPanel);
    l.b = raw(l.np * kPanel);
    return l;
  };
  const int64_t h = D.hidden, cd = D.cond_dim;
  y.freqs = raw(h / 2);
  y.null_cond = raw(D.cond_tokens * cd);
  y.inp = lin(D.d, h);
  y.sig0 = lin(h, h);
  y.sig2 = lin(h, h);
  y.ada = lin(h, 6 * h);
  y.cond_proj = lin(cd, D.cond_tokens * cd);
  for (int64_t i = 0; i < D.layers; ++i) {
    BlockLayout b;
    b.qkv = lin(h, 3 * h);
    b.proj = lin(h, h);
    b.ln2_w = raw(h);
    b.ln2_b = raw(h);
    b.q_x = lin(h, h);
    b.kv_c = lin(cd, 2 * h);
    b.proj_c = lin(h, h);
    b.mlp0 = lin(h, D.mlp);
    b.mlp3 = lin(D.mlp, h);
    y.blocks.push_back(b);
  }
  y.out = lin(h, D.d);
  y.total = off;
  return y;
}

// Where one source parameter goes: a Linear's weight or bias (lin), or a plain copy at `raw`.
struct PackEntry {
  SetDenoiserParamSpec spec;
  const LinearLayout* lin = nullptr;
  bool bias = false;
  int64_t raw = -1;
};

// Every parameter of SetDenoiser.state_dict(), in the order set_denoiser_pack takes them.
inline std::vector<PackEntry> pack_entries(const SetDenoiserDims& D, const Layout& y) {
  std::vector<PackEntry> v;
  auto linear = [&](const std::string& name, const LinearLayout& l) {
    v.push_back({{name + ".weight", {l.N, l.K}}, &l, false, -1});
    v.push_back({{name + ".bias", {l.N}}, &l, true, -1});
  };
  auto plain = [&](const std::string& name, std::vector<int64_t> shape, int64_t at) {
    v.push_back({{name, std::move(shape)}, nullptr, false, at});
  };
  const int64_t h = D.hidden;
  plain("freqs", {h / 2}, y.freqs);
  plain("null_cond", {D.cond_tokens, D.cond_dim}, y.null_cond);
  linear("inp", y.inp);
  linear("sigma_mlp.0", y.sig0);
  linear("sigma_mlp.2", y.sig2);
  linear("ada.1", y.ada);
  linear("cond_proj", y.cond_proj);
  for (int64_t i = 0; i < D.layers; ++i) {
    const BlockLayout& b = y.blocks[static_cast<size_t>(i)];
    const std::string p = "blocks." + std::to_string(i) + ".";
    linear(p + "qkv", b.qkv);
    linear(p + "proj", b.proj);
    plain(p + "norm2.weight", {h}, b.ln2_w);
    plain(p + "norm2.bias", {h}, b.ln2_b);
    linear(p + "q_x", b.q_x);
    linear(p + "kv_c", b.kv_c);
    linear(p + "proj_c", b.proj_c);
    linear(p + "mlp.0", b.mlp0);
    linear(p + "mlp.3", b.mlp3);
  }
  linear("out", y.out);
  return v;
}

}  // namespace ss
}  // namespace r4t
