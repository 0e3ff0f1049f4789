// The portable vector helpers shared by every per-ISA kernel body (knn_impl.h, set_sampler_impl.h).
// NOT a normal header (no include guard): an impl header includes it inside its ISA namespace, after
// defining `constexpr int W` (floats per vector: 4, 8 or 16), so each ISA copy gets its own vf / vi.
// GCC vector extensions only; memcpy loads and stores, so no alignment is assumed.

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

R4T_INLINE vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
R4T_INLINE void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
R4T_INLINE vf vload_partial(const float* p, int64_t n) {  // first n lanes from p, the rest 0
  vf v = {};
  std::memcpy(&v, p, static_cast<size_t>(n) * sizeof(float));
  return v;
}
R4T_INLINE vf vsplat(float x) {  // a broadcast (not `vf{} + x`, which costs an add: 0 + -0 is +0)
  vf v;
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) v[i] = x;
  return v;
}
R4T_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }  // maxps semantics: b when either is NaN
R4T_INLINE vf vmin(vf a, vf b) { return a < b ? a : b; }
R4T_INLINE float hsum(vf v) {  // sum of the lanes, in lane order
  float s = 0.f;
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}
