// The fused sampler's precision bf16 (SampleSetsParams::precision): which Linears it covers, their bf16
// weights (per packing: ss::bf16_weights in set_sampler_prep.h) and one Linear through the GEMM (the
// test hook ops.sampler_linear). NOT a normal header: set_sampler.cpp includes it once, inside its
// anonymous namespace, after pick_isa() and bind().

void check_precision(int precision) {
  check(precision >= 0 && precision <= 2, "precision: expected 0 (fp32), 1 (bf16) or 2 (bf16 emulated)");
}

bool bf16_native_for(const ss::IsaOps& isa) {
#if defined(R4T_SS_X86)
  return std::strcmp(isa.name, "x86-64-v4") == 0 && __builtin_cpu_supports("avx512bf16");
#else
  (void)isa;
  return false;
#endif
}

// The Linears of the forward pass (what precision bf16 covers), with their layouts.
template <class F>
void forward_linears(ss::Model& m, const Layout& y, F&& f) {
  f(m.inp, y.inp);
  f(m.cond_proj, y.cond_proj);
  f(m.out, y.out);
  for (size_t i = 0; i < y.blocks.size(); ++i) {
    ss::BlockW& b = m.blocks[i];
    const ss::BlockLayout& l = y.blocks[i];
    f(b.qkv, l.qkv);
    f(b.proj, l.proj);
    f(b.q_x, l.q_x);
    f(b.kv_c, l.kv_c);
    f(b.proj_c, l.proj_c);
    f(b.mlp0, l.mlp0);
    f(b.mlp3, l.mlp3);
  }
}

// One packed Linear's weights (panels at pk + l.w) for precision bf16: as pairs at pairs + l.w (native) or
// rounded at rounded + l.w (Bf16Weights' layout).
void bf16_linear(const float* pk, const LinearLayout& l, bool native, uint16_t* pairs, float* rounded) {
  const int64_t Kp = l.K + (l.K & 1);
  for (int64_t p = 0; p < l.np; ++p) {
    for (int64_t k = 0; k < l.K; ++k) {
      const float* src = pk + l.w + (p * l.K + k) * ss::kPanel;
      if (native) {
        uint16_t* dst = pairs + l.w + p * Kp * ss::kPanel + (k / 2) * 2 * ss::kPanel + (k & 1);
        for (int64_t j = 0; j < ss::kPanel; ++j) dst[2 * j] = ss::to_bf16(src[j]);
      } else {
        float* dst = rounded + (src - pk);
        for (int64_t j = 0; j < ss::kPanel; ++j) dst[j] = ss::bf16_round(src[j]);
      }
    }
  }
}

// Point l (laid out as ll) at W's copy of its weights: the pairs (native) or the rounded floats, whose
// rows of A the GEMM then rounds too.
void use_bf16(ss::Lin& l, const LinearLayout& ll, const ss::Bf16Weights& W) {
  if (W.native) {
    l.wb = W.pairs.data() + ll.w;
  } else {
    l.w = W.rounded.data() + ll.w;
    l.round_a = true;
  }
}

void fill_bf16(ss::Bf16Weights& W, ss::Model m, const Layout& y, const float* pk) {
  if (W.native) {
    W.pairs.assign(static_cast<size_t>(y.total), 0);
  } else {
    W.rounded.assign(pk, pk + y.total);
  }
  forward_linears(m, y, [&](ss::Lin&, const LinearLayout& l) {
    bf16_linear(pk, l, W.native, W.pairs.data(), W.rounded.data());
  });
}

// x (M, K) @ w (N, K)^T + b through the clone's GEMM at `precision`, on one thread (ops.sampler_linear).
void run_linear(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* b, float* y,
                int precision) {
  check(M >= 0 && K >= 1 && N >= 1, "sampler_linear: expected M >= 0, K >= 1, N >= 1");
  check_precision(precision);
  const ss::IsaOps& isa = pick_isa();
  LinearLayout l;
  l.K = K;
  l.N = N;
  l.np = (N + ss::kPanel - 1) / ss::kPanel;
  l.w = 0;
  l.b = ss::round_up(l.np * K * ss::kPanel, 16);
  std::vector<float> pk(static_cast<size_t>(l.b + l.np * ss::kPanel), 0.f);
  ss::pack_panels(w, l, pk.data());
  std::copy(b, b + N, pk.begin() + l.b);
  Lin L = bind(pk.data(), l);
  ss::Bf16Weights W;
  if (precision != 0) {
    W.native = precision == 1 && bf16_native_for(isa);
    if (W.native) {
      W.pairs.assign(static_cast<size_t>(l.np * (K + (K & 1)) * ss::kPanel), 0);
    } else {
      W.rounded = pk;
    }
    bf16_linear(pk.data(), l, W.native, W.pairs.data(), W.rounded.data());
    use_bf16(L, l, W);
  }
  isa.gemm(L, x, K, M, y, N, Epi::Store, 0, 1);
}
