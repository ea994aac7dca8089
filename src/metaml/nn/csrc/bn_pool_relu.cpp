// metaml's fused CPU kernel for conv4's blocks: training-mode BatchNorm (statistics of the
// batch itself) -> 2x2 max-pooling (stride 2, floor) -> ReLU, on channels-last (NHWC) tensors.
//
// Why: in a conv4 step on the CPU these three run as separate memory-bound kernels, each
// reading and writing the full-size activation (the 64 MiB of a 320x64x28x28 episode), and
// max-pooling's backward zero-fills one more. Fused, the forward reads the activation twice
// (statistics, then normalise-and-pool) and writes only the pooled quarter and a byte per
// pooled value for the window's argmax; the backward reads it once for BatchNorm's two sums
// (which only the pooled positions contribute to) and once to write the gradient.
// conv4's first block also folds in its convolution (1 or 3 input channels): see conv_forward.
// Compiled on first use by metaml/nn/fused.py (torch.utils.cpp_extension); the Python side
// checks shapes and layout and falls back to torch's own kernels for everything else.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

// `value` where `keep` is all ones, 0 where it is 0: an and on the bits, because gcc does not
// vectorize a float select whose condition comes from a byte.
template <typename T>
static inline T masked(T value, bool keep) {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  I bits;
  std::memcpy(&bits, &value, sizeof(T));
  bits &= -I(keep);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}


// The value at a window's argmax k (0..3), from its four values loaded unconditionally and
// masked: branch-free, so gcc vectorizes it (a load behind a branch or a select it does not).
template <typename T>
static inline T at_argmax(int k, T v0, T v1, T v2, T v3) {
  return masked(v0, k == 0) + masked(v1, k == 1) + masked(v2, k == 2) + masked(v3, k == 3);
}

// Per-channel sums of (x - shift) and its square over rows [r0, r1): shifting by the first
// row keeps the float partial sums from cancelling when a channel's mean is large.
template <typename T>
static void accumulate_rows(const T* __restrict__ x, int64_t r0, int64_t r1, int64_t C,
                            const T* __restrict__ shift, T* __restrict__ s, T* __restrict__ q) {
  for (int64_t c = 0; c < C; ++c) { s[c] = T(0); q[c] = T(0); }
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict__ row = x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      T d = row[c] - shift[c];
      s[c] += d;
      q[c] += d * d;
    }
  }
}

// One row of pooling windows over image rows r0 and r2 = r0 + W*C: normalise, take each
// window's maximum (the first on ties, NaN wins, as torch's max_pool2d), ReLU, and the
// argmax (0..3 in row-major order) as a byte.
template <typename T>
static void pool_window_row(const T* __restrict__ r0, const T* __restrict__ r2, int64_t W2, int64_t C,
                            const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                            uint8_t* __restrict__ arg) {
  for (int64_t j = 0; j < W2; ++j) {
    const T* __restrict__ x0 = r0 + 2 * j * C;
    const T* __restrict__ x1 = x0 + C;
    const T* __restrict__ x2 = r2 + 2 * j * C;
    const T* __restrict__ x3 = x2 + C;
    T* __restrict__ o = out + j * C;
    uint8_t* __restrict__ m = arg + j * C;
    for (int64_t c = 0; c < C; ++c) {
      T best = a[c] * x0[c] + b[c];
      int k = 0;
      T v = a[c] * x1[c] + b[c];
      bool t = v > best || v != v;
      best = t ? v : best; k = t ? 1 : k;
      v = a[c] * x2[c] + b[c];
      t = v > best || v != v;
      best = t ? v : best; k = t ? 2 : k;
      v = a[c] * x3[c] + b[c];
      t = v > best || v != v;
      best = t ? v : best; k = t ? 3 : k;
      o[c] = (best > T(0) || best != best) ? best : T(0);
      m[c] = uint8_t(k);
    }
  }
}

// BatchNorm's two backward sums over one row of windows: sum(dy) and sum(dy * (x - mean)),
// where dy, the gradient at BatchNorm's output, is the pooled gradient (zero where the ReLU
// cut) at each window's argmax and zero elsewhere.
template <typename T>
static void grad_sums_row(const T* __restrict__ r0, const T* __restrict__ r2, int64_t W2, int64_t C,
                          const T* __restrict__ out, const T* __restrict__ g, const uint8_t* __restrict__ arg,
                          const T* __restrict__ mean, T* __restrict__ s1, T* __restrict__ s2) {
  for (int64_t c = 0; c < C; ++c) { s1[c] = T(0); s2[c] = T(0); }
  for (int64_t j = 0; j < W2; ++j) {
    const T* __restrict__ x0 = r0 + 2 * j * C;
    const T* __restrict__ x1 = x0 + C;
    const T* __restrict__ x2 = r2 + 2 * j * C;
    const T* __restrict__ x3 = x2 + C;
    const T* __restrict__ o = out + j * C;
    const T* __restrict__ gg = g + j * C;
    const uint8_t* __restrict__ m = arg + j * C;
    for (int64_t c = 0; c < C; ++c) {
      const T gv = masked(gg[c], o[c] > T(0));
      const T xv = at_argmax(m[c], x0[c], x1[c], x2[c], x3[c]);
      s1[c] += gv;
      s2[c] += gv * (xv - mean[c]);
    }
  }
}

template <typename T>
static void dx_affine(const T* __restrict__ x, T* __restrict__ dx, int64_t n, int64_t C, const T* __restrict__ A,
                      const T* __restrict__ B) {
  for (int64_t e = 0; e < n; ++e)
    for (int64_t c = 0; c < C; ++c) dx[e * C + c] = A[c] * x[e * C + c] + B[c];
}

// dx of the two image rows r0, r2 = r0 + W*C under one row of pooling windows.
template <typename T>
static void dx_window_row(const T* __restrict__ r0, const T* __restrict__ r2, T* __restrict__ d0,
                          T* __restrict__ d2, int64_t W, int64_t W2, int64_t C, const T* __restrict__ out,
                          const T* __restrict__ g, const uint8_t* __restrict__ arg, const T* __restrict__ A,
                          const T* __restrict__ B, const T* __restrict__ K) {
  for (int64_t j = 0; j < W2; ++j) {
    const int64_t e = 2 * j * C;
    const T* __restrict__ o = out + j * C;
    const T* __restrict__ gg = g + j * C;
    const uint8_t* __restrict__ m = arg + j * C;
    for (int64_t c = 0; c < C; ++c) {
      // kg lands on the window's maximum
      const T kg = masked(K[c] * gg[c], o[c] > T(0));
      const int k = m[c];
      d0[e + c] = A[c] * r0[e + c] + B[c] + masked(kg, k == 0);
      d0[e + C + c] = A[c] * r0[e + C + c] + B[c] + masked(kg, k == 1);
      d2[e + c] = A[c] * r2[e + c] + B[c] + masked(kg, k == 2);
      d2[e + C + c] = A[c] * r2[e + C + c] + B[c] + masked(kg, k == 3);
    }
  }
  if (W % 2) {  // the last column is in no window
    dx_affine<T>(r0 + (W - 1) * C, d0 + (W - 1) * C, 1, C, A, B);
    dx_affine<T>(r2 + (W - 1) * C, d2 + (W - 1) * C, 1, C, A, B);
  }
}

// BatchNorm's statistics from per-chunk partial sums of (value - shift) and its square, and
// its affine map y = a * x + b with them; fills mean, the biased variance and 1/std.
template <typename T>
static void finish_statistics(const std::vector<T>& ps, const std::vector<T>& pq, int64_t chunks, int64_t C,
                              int64_t count, const T* shift, const T* wp, const T* bp, double eps, std::vector<T>& a,
                              std::vector<T>& b, at::Tensor& mean_t, at::Tensor& var_t, at::Tensor& invstd_t) {
  for (int64_t c = 0; c < C; ++c) {
    double s = 0, q = 0;
    for (int64_t k = 0; k < chunks; ++k) { s += ps[k * C + c]; q += pq[k * C + c]; }
    const double m = s / count, var = std::max(q / count - m * m, 0.0), mean = double(shift[c]) + m;
    const double inv = 1.0 / std::sqrt(var + eps), gam = wp ? double(wp[c]) : 1.0;
    a[c] = T(gam * inv);
    b[c] = T((bp ? double(bp[c]) : 0.0) - mean * gam * inv);
    mean_t.data_ptr<T>()[c] = T(mean);
    var_t.data_ptr<T>()[c] = T(var);
    invstd_t.data_ptr<T>()[c] = T(inv);
  }
}

// From BatchNorm's backward sums per chunk, s1 = sum(dy) and s2 = sum(dy * (x - mean)): the
// gradients of its weight and bias, and dx = K * dy + A * x + B, which is
// k * (dy - S1/M - xhat * S2/M) with xhat = (x - mean) * inv and k = weight * inv.
template <typename T>
static void backward_coefficients(const std::vector<T>& s1, const std::vector<T>& s2, int64_t chunks, int64_t C,
                                  int64_t count, const T* mean, const T* inv, const T* wp, at::Tensor& dw,
                                  at::Tensor& db, std::vector<T>& K, std::vector<T>& A, std::vector<T>& B) {
  for (int64_t c = 0; c < C; ++c) {
    double S1 = 0, S2 = 0;
    for (int64_t k = 0; k < chunks; ++k) { S1 += s1[k * C + c]; S2 += s2[k * C + c]; }
    S2 *= double(inv[c]);  // the sum of dy * xhat
    db.data_ptr<T>()[c] = T(S1);
    dw.data_ptr<T>()[c] = T(S2);
    const double k = (wp ? double(wp[c]) : 1.0) * double(inv[c]);
    K[c] = T(k);
    A[c] = T(-k * double(inv[c]) * S2 / count);
    B[c] = T(-k * S1 / count + k * double(mean[c]) * double(inv[c]) * S2 / count);
  }
}

std::vector<at::Tensor> forward(at::Tensor x, c10::optional<at::Tensor> weight, c10::optional<at::Tensor> bias, double eps) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), H2 = H / 2, W2 = W / 2;
  auto out = at::empty({N, C, H2, W2}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto idx = at::empty({N, C, H2, W2}, x.options().dtype(at::kByte).memory_format(at::MemoryFormat::ChannelsLast));
  auto mean_t = at::empty({C}, x.options());
  auto var_t = at::empty({C}, x.options());
  auto invstd_t = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_pool_relu_forward", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const int64_t rows = N * H * W, grain = 512, chunks = (rows + grain - 1) / grain;
    std::vector<T> shift(xp, xp + C), ps(chunks * C), pq(chunks * C);
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        accumulate_rows<T>(xp, k * grain, std::min(rows, (k + 1) * grain), C, shift.data(), ps.data() + k * C, pq.data() + k * C);
    });
    std::vector<T> a(C), b(C);
    const T* wp = weight.has_value() && weight->defined() ? weight->data_ptr<T>() : nullptr;
    const T* bp = bias.has_value() && bias->defined() ? bias->data_ptr<T>() : nullptr;
    finish_statistics<T>(ps, pq, chunks, C, rows, shift.data(), wp, bp, eps, a, b, mean_t, var_t, invstd_t);
    T* op = out.data_ptr<T>();
    uint8_t* mp = idx.data_ptr<uint8_t>();
    at::parallel_for(0, N * H2, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / H2, i = p % H2;
        const T* r0 = xp + (n * H + 2 * i) * W * C;
        pool_window_row<T>(r0, r0 + W * C, W2, C, a.data(), b.data(), op + p * W2 * C, mp + p * W2 * C);
      }
    });
  });
  return {out, idx, mean_t, var_t, invstd_t};
}

std::vector<at::Tensor> backward(at::Tensor g, at::Tensor out, at::Tensor idx, at::Tensor x, at::Tensor mean_t,
                                 at::Tensor invstd_t, c10::optional<at::Tensor> weight) {
  g = g.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), H2 = H / 2, W2 = W / 2;
  const int64_t M = N * H * W, P = N * H2;
  auto dx = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto dw = at::empty({C}, x.options());
  auto db = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_pool_relu_backward", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>(), *op = out.data_ptr<T>();
    const uint8_t* mp = idx.data_ptr<uint8_t>();
    const T *mean = mean_t.data_ptr<T>(), *inv = invstd_t.data_ptr<T>();
    const T* wp = weight.has_value() && weight->defined() ? weight->data_ptr<T>() : nullptr;
    std::vector<T> s1(P * C), s2(P * C);
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / H2, i = p % H2;
        const T* r0 = xp + (n * H + 2 * i) * W * C;
        grad_sums_row<T>(r0, r0 + W * C, W2, C, op + p * W2 * C, gp + p * W2 * C, mp + p * W2 * C, mean,
                         s1.data() + p * C, s2.data() + p * C);
      }
    });
    std::vector<T> K(C), A(C), B(C);
    backward_coefficients<T>(s1, s2, P, C, M, mean, inv, wp, dw, db, K, A, B);
    T* dp = dx.data_ptr<T>();
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / H2, i = p % H2, e = (n * H + 2 * i) * W * C;
        dx_window_row<T>(xp + e, xp + e + W * C, dp + e, dp + e + W * C, W, W2, C, op + p * W2 * C,
                         gp + p * W2 * C, mp + p * W2 * C, A.data(), B.data(), K.data());
        if (H % 2 && i == H2 - 1)  // the last image row is in no window
          dx_affine<T>(xp + e + 2 * W * C, dp + e + 2 * W * C, W, C, A.data(), B.data());
      }
    });
  });
  return {dx, dw, db};
}

// ---- the double backward: the backward's own gradients, for second-order MAML ---------------
//
// The backward maps (g, x, weight) to (dx, dweight, dbias) through dy, the gradient at
// BatchNorm's output (g at each window's argmax where the ReLU passed, 0 elsewhere):
//   dx = k (dy - S1/M - xhat S2/M), dweight = S2, dbias = S1,
// with S1 = sum(dy), S2 = sum(dy xhat), k = weight inv and xhat = (x - mean) inv per channel.
// Given a loss's gradients gdx, gdw, gdb at (dx, dweight, dbias), its gradients at g, x and the
// weight follow (pooling and ReLU pass on their masks, constant almost everywhere):
//   at g:      mask (k gdx + (gdw - k T2/M) xhat + gdb - k T1/M), read at the argmax,
//   at weight: inv (U - T1 S1/M - T2 S2/M),
//   at x:      a1 dy + a3 gdx + (a2 - a1 S2/M - a3 T2/M) xhat - (a1 S1 + a3 T1)/M,
// with T1 = sum(gdx), T2 = sum(gdx xhat), U = sum(gdx dy), a1 = inv gdw - weight inv^2 T2/M,
// a2 = -weight inv^2 (U - T1 S1/M - T2 S2/M)/M and a3 = -weight inv^2 S2/M. Derived by hand;
// the tests check it against torch's double backward of the unfused ops and finite differences.

// sum(gdx) and sum(gdx * (x - mean)) over n positions, added into t1 and t2.
template <typename T>
static void gdx_sums(const T* __restrict__ x, const T* __restrict__ gd, int64_t n, int64_t C,
                     const T* __restrict__ mean, T* __restrict__ t1, T* __restrict__ t2) {
  for (int64_t e = 0; e < n; ++e)
    for (int64_t c = 0; c < C; ++c) {
      const T v = gd[e * C + c];
      t1[c] += v;
      t2[c] += v * (x[e * C + c] - mean[c]);
    }
}

// One row of windows: s1 += dy, s2 += dy * (x - mean), u += dy * gdx, at each window's argmax.
template <typename T>
static void dy_sums_row(const T* __restrict__ r0, const T* __restrict__ r2, const T* __restrict__ q0,
                        const T* __restrict__ q2, int64_t W2, int64_t C, const T* __restrict__ out,
                        const T* __restrict__ g, const uint8_t* __restrict__ arg, const T* __restrict__ mean,
                        T* __restrict__ s1, T* __restrict__ s2, T* __restrict__ u) {
  for (int64_t j = 0; j < W2; ++j) {
    const int64_t e = 2 * j * C;
    const T* __restrict__ o = out + j * C;
    const T* __restrict__ gg = g + j * C;
    const uint8_t* __restrict__ m = arg + j * C;
    for (int64_t c = 0; c < C; ++c) {
      const T gv = masked(gg[c], o[c] > T(0));
      const int k = m[c];
      const T xv = at_argmax(k, r0[e + c], r0[e + C + c], r2[e + c], r2[e + C + c]);
      const T qv = at_argmax(k, q0[e + c], q0[e + C + c], q2[e + c], q2[e + C + c]);
      s1[c] += gv;
      s2[c] += gv * (xv - mean[c]);
      u[c] += gv * qv;
    }
  }
}

// d = a3 * gdx + A * x + B over n positions.
template <typename T>
static void gx_affine(const T* __restrict__ x, const T* __restrict__ gd, T* __restrict__ d, int64_t n, int64_t C,
                      const T* __restrict__ a3, const T* __restrict__ A, const T* __restrict__ B) {
  for (int64_t e = 0; e < n; ++e)
    for (int64_t c = 0; c < C; ++c) d[e * C + c] = a3[c] * gd[e * C + c] + A[c] * x[e * C + c] + B[c];
}

// One row of windows: a1 * dy added at each argmax of d, and the gradient at g,
// mask * (k * gdx + Gx * x + Gb) read at the argmax.
template <typename T>
static void window_terms_row(const T* __restrict__ r0, const T* __restrict__ r2, const T* __restrict__ q0,
                             const T* __restrict__ q2, T* __restrict__ d0, T* __restrict__ d2, int64_t W2, int64_t C,
                             const T* __restrict__ out, const T* __restrict__ g, const uint8_t* __restrict__ arg,
                             const T* __restrict__ a1, const T* __restrict__ K, const T* __restrict__ Gx,
                             const T* __restrict__ Gb, T* __restrict__ gg_out) {
  for (int64_t j = 0; j < W2; ++j) {
    const int64_t e = 2 * j * C;
    const T* __restrict__ o = out + j * C;
    const T* __restrict__ gg = g + j * C;
    const uint8_t* __restrict__ m = arg + j * C;
    T* __restrict__ go = gg_out + j * C;
    for (int64_t c = 0; c < C; ++c) {
      const bool pass = o[c] > T(0);
      const int k = m[c];
      const T xv = at_argmax(k, r0[e + c], r0[e + C + c], r2[e + c], r2[e + C + c]);
      const T qv = at_argmax(k, q0[e + c], q0[e + C + c], q2[e + c], q2[e + C + c]);
      const T add = masked(a1[c] * gg[c], pass);
      d0[e + c] += masked(add, k == 0);
      d0[e + C + c] += masked(add, k == 1);
      d2[e + c] += masked(add, k == 2);
      d2[e + C + c] += masked(add, k == 3);
      go[c] = masked(K[c] * qv + Gx[c] * xv + Gb[c], pass);
    }
  }
}

std::vector<at::Tensor> double_backward(at::Tensor gdx, c10::optional<at::Tensor> gdw, c10::optional<at::Tensor> gdb,
                                        at::Tensor g, at::Tensor out, at::Tensor idx, at::Tensor x, at::Tensor mean_t,
                                        at::Tensor invstd_t, c10::optional<at::Tensor> weight) {
  g = g.contiguous(at::MemoryFormat::ChannelsLast);
  gdx = gdx.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), H2 = H / 2, W2 = W / 2;
  const int64_t M = N * H * W, P = N * H2;
  auto gx = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto gg = at::empty_like(out, out.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto gw = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_pool_relu_double_backward", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *qp = gdx.data_ptr<T>(), *gp = g.data_ptr<T>(), *op = out.data_ptr<T>();
    const uint8_t* mp = idx.data_ptr<uint8_t>();
    const T *mean = mean_t.data_ptr<T>(), *inv = invstd_t.data_ptr<T>();
    const T* wp = weight.has_value() && weight->defined() ? weight->data_ptr<T>() : nullptr;
    const T* gwp = gdw.has_value() && gdw->defined() ? gdw->data_ptr<T>() : nullptr;
    const T* gbp = gdb.has_value() && gdb->defined() ? gdb->data_ptr<T>() : nullptr;
    // each pooled row p sums over its image rows 2i, 2i+1 (and the last one when H is odd)
    std::vector<T> s1(P * C, T(0)), s2(P * C, T(0)), t1(P * C, T(0)), t2(P * C, T(0)), u(P * C, T(0));
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / H2, i = p % H2, e = (n * H + 2 * i) * W * C;
        const int64_t rows = (H % 2 && i == H2 - 1) ? 3 : 2;
        gdx_sums<T>(xp + e, qp + e, rows * W, C, mean, t1.data() + p * C, t2.data() + p * C);
        dy_sums_row<T>(xp + e, xp + e + W * C, qp + e, qp + e + W * C, W2, C, op + p * W2 * C, gp + p * W2 * C,
                       mp + p * W2 * C, mean, s1.data() + p * C, s2.data() + p * C, u.data() + p * C);
      }
    });
    std::vector<T> a1(C), a3(C), A(C), B(C), K(C), Gx(C), Gb(C);
    T* gwo = gw.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      double S1 = 0, S2 = 0, T1 = 0, T2 = 0, U = 0;
      for (int64_t p = 0; p < P; ++p) {
        S1 += s1[p * C + c]; S2 += s2[p * C + c]; T1 += t1[p * C + c]; T2 += t2[p * C + c]; U += u[p * C + c];
      }
      const double iv = inv[c], mu = mean[c], gam = wp ? double(wp[c]) : 1.0, k = gam * iv;
      S2 *= iv;  // sums of dy * xhat and gdx * xhat
      T2 *= iv;
      const double gdwc = gwp ? double(gwp[c]) : 0.0, gdbc = gbp ? double(gbp[c]) : 0.0;
      const double r = U - T1 * S1 / M - T2 * S2 / M;
      gwo[c] = T(iv * r);
      const double c1 = iv * gdwc - gam * iv * iv * T2 / M, c2 = -gam * iv * iv * r / M, c3 = -gam * iv * iv * S2 / M;
      const double cx = c2 - c1 * S2 / M - c3 * T2 / M, c0 = -(c1 * S1 + c3 * T1) / M;
      a1[c] = T(c1);
      a3[c] = T(c3);
      A[c] = T(cx * iv);
      B[c] = T(c0 - cx * iv * mu);
      const double R = gdwc - k * T2 / M, Q = gdbc - k * T1 / M;
      K[c] = T(k);
      Gx[c] = T(R * iv);
      Gb[c] = T(Q - R * iv * mu);
    }
    T *dp = gx.data_ptr<T>(), *gop = gg.data_ptr<T>();
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / H2, i = p % H2, e = (n * H + 2 * i) * W * C;
        const int64_t rows = (H % 2 && i == H2 - 1) ? 3 : 2;
        gx_affine<T>(xp + e, qp + e, dp + e, rows * W, C, a3.data(), A.data(), B.data());
        window_terms_row<T>(xp + e, xp + e + W * C, qp + e, qp + e + W * C, dp + e, dp + e + W * C, W2, C,
                            op + p * W2 * C, gp + p * W2 * C, mp + p * W2 * C, a1.data(), K.data(), Gx.data(),
                            Gb.data(), gop + p * W2 * C);
      }
    });
  });
  return {gg, gx, gw};
}

// ---- the first block: a 3x3 convolution of 1 or 3 input channels, then the same -------------
//
// Its output (64 channels at full resolution) is never stored: the forward computes it twice
// (statistics, then normalise-and-pool) and the backward twice (BatchNorm's sums at the
// argmax, then the output gradient, folded at once into the weight and bias gradients), nine
// multiply-adds per value from the padded image. 8 channels at a time in registers.

constexpr int L = 8;  // channels per block: one AVX register of floats

// GCC/Clang vector extensions: explicit 8-lane arithmetic, whatever the compiler's loop analysis
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(L * 4)));
  typedef int32_t I __attribute__((vector_size(L * 4)));
};
template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(L * 8)));
  typedef int64_t I __attribute__((vector_size(L * 8)));
};
template <typename T>
using Vec = typename Lanes<T>::V;
template <typename T>
using IVec = typename Lanes<T>::I;

template <typename T>
static inline Vec<T> load(const T* p) { Vec<T> v; std::memcpy(&v, p, sizeof(v)); return v; }
template <typename T>
static inline void store(T* p, Vec<T> v) { std::memcpy(p, &v, sizeof(v)); }
// v where mask is all ones, 0 where it is 0
template <typename T>
static inline Vec<T> keep(Vec<T> v, IVec<T> mask) { return (Vec<T>)((IVec<T>)v & mask); }

struct Geo { int64_t N, Cin, H, W, C, H2, W2, Hp, Wp; };

// padded image (N, H+2, W+2, Cin) and the weight as (K, C) with k in (kh, kw, ci) order
template <int KN, typename T>
static inline void patch(const T* __restrict__ pad, const Geo& g, int64_t n, int64_t h, int64_t w, T* __restrict__ p) {
  constexpr int Cin = KN / 9;
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw)
      for (int ci = 0; ci < Cin; ++ci)
        p[(kh * 3 + kw) * Cin + ci] = pad[((n * g.Hp + h + kh) * g.Wp + w + kw) * Cin + ci];
}

template <int KN, typename T>
static inline Vec<T> conv8(const T* __restrict__ p, const T* __restrict__ w, Vec<T> b) {
  Vec<T> a = b;
  for (int k = 0; k < KN; ++k) a += p[k] * load<T>(w + k * L);
  return a;
}

// weights regrouped per block: wb[blk][k][l]
template <typename T>
static std::vector<T> blocked_weight(const at::Tensor& cw, int64_t C, int64_t Cin) {
  auto w = cw.permute({0, 2, 3, 1}).contiguous();  // (C, kh, kw, ci)
  const T* wp = w.data_ptr<T>();
  const int64_t K = 9 * Cin;
  std::vector<T> out(C * K);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < K; ++k) out[((c / L) * K + k) * L + c % L] = wp[c * K + k];
  return out;
}

// How the first block's passes split rows among threads: at most 32 chunks of rows, each
// crossed with every 8-channel block. Each chunk writes its own partial sums, added up in chunk
// order afterwards, so the result does not depend on the thread count.
static int64_t chunk_count(int64_t rows) { return std::min<int64_t>(rows, 32); }

// fn(chunk, block, first_row, end_row) for every chunk of [0, rows) and every block, in parallel.
template <typename F>
static void for_chunks_and_blocks(int64_t rows, int64_t chunks, int64_t blocks, const F& fn) {
  at::parallel_for(0, chunks * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k = t / blocks;
      fn(k, t % blocks, rows * k / chunks, rows * (k + 1) / chunks);
    }
  });
}

// The sizes of a first block: images (N, Cin, H, W), C filters, the pooled and padded maps.
static Geo geometry(const at::Tensor& img, const at::Tensor& cw) {
  const int64_t H = img.size(2), W = img.size(3);
  return Geo{img.size(0), img.size(1), H, W, cw.size(0), H / 2, W / 2, H + 2, W + 2};
}

// run(std::integral_constant<int, KN>) with KN = 9 * Cin for the images' 1 or 3 channels.
template <typename F>
static void with_patch_size(const at::Tensor& img, const F& run) {
  if (img.size(1) == 1) run(std::integral_constant<int, 9>{});
  else run(std::integral_constant<int, 27>{});
}

// The images zero-padded by one pixel, (N, H+2, W+2, Cin) contiguous: patches need no bounds checks.
static at::Tensor padded_nhwc(const at::Tensor& img) {
  return at::constant_pad_nd(img, {1, 1, 1, 1}).permute({0, 2, 3, 1}).contiguous();
}

template <int KN, typename T>
static void forward_impl(const at::Tensor& img, const at::Tensor& cw, const at::Tensor& cb, const T* wp, const T* bp,
                         double eps, at::Tensor& out, at::Tensor& idx, at::Tensor& mean_t, at::Tensor& var_t, at::Tensor& invstd_t) {
  const Geo g = geometry(img, cw);
  const at::Tensor padded = padded_nhwc(img);
  const T* pad = padded.data_ptr<T>();
  const std::vector<T> wb = blocked_weight<T>(cw, g.C, g.Cin);
  const T* cbp = cb.data_ptr<T>();
  const int64_t blocks = g.C / L, rows = g.N * g.H, chunks = chunk_count(rows);
  std::vector<T> ps(chunks * g.C), pq(chunks * g.C);
  for_chunks_and_blocks(rows, chunks, blocks, [&](int64_t k, int64_t blk, int64_t r0, int64_t r1) {
    const T* w = wb.data() + blk * KN * L;
    const Vec<T> b = load<T>(cbp + blk * L);
    Vec<T> s = {}, q = {};
    T p[KN];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.H, h = r % g.H;
      for (int64_t wc = 0; wc < g.W; ++wc) {
        patch<KN>(pad, g, n, h, wc, p);
        const Vec<T> d = conv8<KN>(p, w, b) - b;  // shifted by the bias: a small mean is left
        s += d;
        q += d * d;
      }
    }
    store<T>(ps.data() + k * g.C + blk * L, s);
    store<T>(pq.data() + k * g.C + blk * L, q);
  });
  const int64_t M = g.N * g.H * g.W;
  std::vector<T> A(g.C), B(g.C);
  finish_statistics<T>(ps, pq, chunks, g.C, M, cbp, wp, bp, eps, A, B, mean_t, var_t, invstd_t);
  T* op = out.data_ptr<T>();
  uint8_t* mp = idx.data_ptr<uint8_t>();
  at::parallel_for(0, g.N * g.H2, 1, [&](int64_t p0, int64_t p1) {
    T p[4][KN];
    for (int64_t pr = p0; pr < p1; ++pr) {
      const int64_t n = pr / g.H2, i = pr % g.H2;
      for (int64_t j = 0; j < g.W2; ++j) {
        for (int s = 0; s < 4; ++s) patch<KN>(pad, g, n, 2 * i + s / 2, 2 * j + s % 2, p[s]);
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const T* w = wb.data() + blk * KN * L;
          const Vec<T> b = load<T>(cbp + blk * L), a = load<T>(A.data() + blk * L), bb = load<T>(B.data() + blk * L);
          Vec<T> best = a * conv8<KN>(p[0], w, b) + bb;
          IVec<T> kk = {};
          for (int s = 1; s < 4; ++s) {
            const Vec<T> y = a * conv8<KN>(p[s], w, b) + bb;
            const IVec<T> t = (y > best) | (y != y);  // the first maximum wins ties; NaN wins
            best = t ? y : best;
            kk = t ? IVec<T>{} + s : kk;
          }
          const IVec<T> pos = (best > 0) | (best != best);
          store<T>(op + (pr * g.W2 + j) * g.C + blk * L, keep<T>(best, pos));
          uint8_t* m = mp + (pr * g.W2 + j) * g.C + blk * L;
          for (int l = 0; l < L; ++l) m[l] = uint8_t(kk[l]);
        }
      }
    }
  });
}

std::vector<at::Tensor> conv_forward(at::Tensor img, at::Tensor cw, at::Tensor cb, c10::optional<at::Tensor> weight,
                                     c10::optional<at::Tensor> bias, double eps) {
  const int64_t N = img.size(0), C = cw.size(0), H2 = img.size(2) / 2, W2 = img.size(3) / 2;
  auto out = at::empty({N, C, H2, W2}, img.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto idx = at::empty({N, C, H2, W2}, img.options().dtype(at::kByte).memory_format(at::MemoryFormat::ChannelsLast));
  auto mean_t = at::empty({C}, img.options()), var_t = at::empty({C}, img.options()), invstd_t = at::empty({C}, img.options());
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "conv_forward", [&] {
    using T = scalar_t;
    const T* wp = weight.has_value() && weight->defined() ? weight->data_ptr<T>() : nullptr;
    const T* bp = bias.has_value() && bias->defined() ? bias->data_ptr<T>() : nullptr;
    with_patch_size(img, [&](auto kn) {
      forward_impl<decltype(kn)::value, T>(img, cw, cb, wp, bp, eps, out, idx, mean_t, var_t, invstd_t);
    });
  });
  return {out, idx, mean_t, var_t, invstd_t};
}

// The convolution's weight and bias gradients from its output gradient: gradient_of(blk) gives
// d(n, h, w, patch) for one 8-channel block at one pixel (its per-block constants loaded once).
// Per chunk of image rows, summed in chunk order.
template <int KN, typename T, typename G>
static void fold_weight_grad(const Geo& g, const T* pad, const G& gradient_of, at::Tensor& dcw, at::Tensor& dcb) {
  const int64_t blocks = g.C / L, rows = g.N * g.H, chunks = chunk_count(rows);
  std::vector<T> pw(chunks * g.C * KN), pb(chunks * g.C);
  for_chunks_and_blocks(rows, chunks, blocks, [&](int64_t k, int64_t blk, int64_t r0, int64_t r1) {
    const auto d_at = gradient_of(blk);
    Vec<T> dw[KN] = {}, db = {};
    T p[KN];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.H, h = r % g.H;
      for (int64_t wc = 0; wc < g.W; ++wc) {
        patch<KN>(pad, g, n, h, wc, p);
        const Vec<T> d = d_at(n, h, wc, p);
        db += d;
        for (int kk = 0; kk < KN; ++kk) dw[kk] += p[kk] * d;
      }
    }
    for (int kk = 0; kk < KN; ++kk)
      for (int l = 0; l < L; ++l) pw[(k * g.C + blk * L + l) * KN + kk] = dw[kk][l];
    store<T>(pb.data() + k * g.C + blk * L, db);
  });
  // dcw as (C, kh, kw, ci) -> the weight's (C, ci, kh, kw)
  auto dperm = at::empty({g.C, 3, 3, g.Cin}, dcw.options());
  T* dp = dperm.data_ptr<T>();
  for (int64_t e = 0; e < g.C * KN; ++e) {
    double s = 0;
    for (int64_t k = 0; k < chunks; ++k) s += pw[k * g.C * KN + e];
    dp[e] = T(s);
  }
  dcw.copy_(dperm.permute({0, 3, 1, 2}));
  for (int64_t c = 0; c < g.C; ++c) {
    double s = 0;
    for (int64_t k = 0; k < chunks; ++k) s += pb[k * g.C + c];
    dcb.data_ptr<T>()[c] = T(s);
  }
}

template <int KN, typename T>
static void backward_impl(const at::Tensor& gr, const at::Tensor& out, const at::Tensor& idx, const at::Tensor& img,
                          const at::Tensor& cw, const at::Tensor& cb, const T* mean, const T* inv, const T* wp,
                          at::Tensor& dcw, at::Tensor& dcb, at::Tensor& dgam, at::Tensor& dbet) {
  const Geo g = geometry(img, cw);
  const at::Tensor padded = padded_nhwc(img);
  const T* pad = padded.data_ptr<T>();
  const std::vector<T> wb = blocked_weight<T>(cw, g.C, g.Cin);
  const T *cbp = cb.data_ptr<T>(), *gp = gr.data_ptr<T>(), *op = out.data_ptr<T>();
  const uint8_t* mp = idx.data_ptr<uint8_t>();
  const int64_t blocks = g.C / L, P = g.N * g.H2, chunks1 = chunk_count(P);
  std::vector<T> s1(chunks1 * g.C), s2(chunks1 * g.C);
  for_chunks_and_blocks(P, chunks1, blocks, [&](int64_t k, int64_t blk, int64_t r0, int64_t r1) {
    const T* w = wb.data() + blk * KN * L;
    const Vec<T> b = load<T>(cbp + blk * L), mu = load<T>(mean + blk * L);
    Vec<T> a1 = {}, a2 = {};
    T p[KN];
    for (int64_t pr = r0; pr < r1; ++pr) {
      const int64_t n = pr / g.H2, i = pr % g.H2;
      for (int64_t j = 0; j < g.W2; ++j) {
        const int64_t o = (pr * g.W2 + j) * g.C + blk * L;
        IVec<T> km;
        for (int l = 0; l < L; ++l) km[l] = mp[o + l];
        Vec<T> xv = {};
        for (int s = 0; s < 4; ++s) {
          patch<KN>(pad, g, n, 2 * i + s / 2, 2 * j + s % 2, p);
          xv += keep<T>(conv8<KN>(p, w, b), km == s);
        }
        const Vec<T> gv = keep<T>(load<T>(gp + o), load<T>(op + o) > 0);
        a1 += gv;
        a2 += gv * (xv - mu);
      }
    }
    store<T>(s1.data() + k * g.C + blk * L, a1);
    store<T>(s2.data() + k * g.C + blk * L, a2);
  });
  const int64_t M = g.N * g.H * g.W;
  std::vector<T> KK(g.C), A(g.C), B(g.C);
  backward_coefficients<T>(s1, s2, chunks1, g.C, M, mean, inv, wp, dgam, dbet, KK, A, B);
  fold_weight_grad<KN, T>(g, pad, [&](int64_t blk) {
    const T* w = wb.data() + blk * KN * L;
    const Vec<T> b = load<T>(cbp + blk * L), Ab = load<T>(A.data() + blk * L), Bb = load<T>(B.data() + blk * L);
    const Vec<T> Kb = load<T>(KK.data() + blk * L);
    return [=, &g](int64_t n, int64_t h, int64_t wc, const T* p) {
      Vec<T> d = Ab * conv8<KN>(p, w, b) + Bb;
      const int64_t i = h / 2, j = wc / 2;
      if (i < g.H2 && j < g.W2) {  // in a pooling window: the gradient lands on its argmax
        const int64_t o = ((n * g.H2 + i) * g.W2 + j) * g.C + blk * L;
        IVec<T> km;
        for (int l = 0; l < L; ++l) km[l] = mp[o + l];
        const IVec<T> hit = (km == int((h & 1) * 2 + (wc & 1))) & (load<T>(op + o) > 0);
        d += keep<T>(Kb * load<T>(gp + o), hit);
      }
      return d;
    };
  }, dcw, dcb);
}

std::vector<at::Tensor> conv_backward(at::Tensor gr, at::Tensor out, at::Tensor idx, at::Tensor img, at::Tensor cw,
                                      at::Tensor cb, at::Tensor mean_t, at::Tensor invstd_t, c10::optional<at::Tensor> weight) {
  gr = gr.contiguous(at::MemoryFormat::ChannelsLast);
  auto dcw = at::empty_like(cw, cw.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t C = cw.size(0);
  auto dcb = at::empty({C}, img.options()), dgam = at::empty({C}, img.options()), dbet = at::empty({C}, img.options());
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "conv_backward", [&] {
    using T = scalar_t;
    const T* wp = weight.has_value() && weight->defined() ? weight->data_ptr<T>() : nullptr;
    with_patch_size(img, [&](auto kn) {
      backward_impl<decltype(kn)::value, T>(gr, out, idx, img, cw, cb, mean_t.data_ptr<T>(), invstd_t.data_ptr<T>(), wp,
                                            dcw, dcb, dgam, dbet);
    });
  });
  return {dcw, dcb, dgam, dbet};
}

// ---- the first block's convolution alone, for its double backward -------------------------
//
// A backward with create_graph=True (a second-order inner step) needs the convolution's output
// (which the fused passes never store) and the weight gradient of a full-resolution output
// gradient: torch's kernels run a 1-channel convolution at 3-27% of the machine's peak.

// images (N, Cin, H, W) * cw (C, Cin, 3, 3) + cb, padding 1: (N, C, H, W) channels-last.
std::vector<at::Tensor> first_conv(at::Tensor img, at::Tensor cw, at::Tensor cb) {
  auto z = at::empty({img.size(0), cw.size(0), img.size(2), img.size(3)},
                     img.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "first_conv", [&] {
    using T = scalar_t;
    const auto run = [&](auto kn) {
      constexpr int KN = decltype(kn)::value;
      const Geo g = geometry(img, cw);
      const at::Tensor padded = padded_nhwc(img);
      const T* pad = padded.data_ptr<T>();
      const std::vector<T> wb = blocked_weight<T>(cw, g.C, g.Cin);
      const T* cbp = cb.data_ptr<T>();
      T* zp = z.data_ptr<T>();
      const int64_t rows = g.N * g.H;
      for_chunks_and_blocks(rows, chunk_count(rows), g.C / L, [&](int64_t, int64_t blk, int64_t r0, int64_t r1) {
        const T* w = wb.data() + blk * KN * L;
        const Vec<T> b = load<T>(cbp + blk * L);
        T p[KN];
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t wc = 0; wc < g.W; ++wc) {
            patch<KN>(pad, g, r / g.H, r % g.H, wc, p);
            store<T>(zp + (r * g.W + wc) * g.C + blk * L, conv8<KN>(p, w, b));
          }
      });
    };
    with_patch_size(img, run);
  });
  return {z};
}

// The weight and bias gradients of first_conv for an output gradient d (N, C, H, W).
std::vector<at::Tensor> first_conv_weight_grad(at::Tensor img, at::Tensor d) {
  d = d.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t C = d.size(1), Cin = img.size(1);
  auto dcw = at::empty({C, Cin, 3, 3}, img.options()), dcb = at::empty({C}, img.options());
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "first_conv_weight_grad", [&] {
    using T = scalar_t;
    const auto run = [&](auto kn) {
      constexpr int KN = decltype(kn)::value;
      const Geo g = geometry(img, dcw);
      const at::Tensor padded = padded_nhwc(img);
      const T* dp = d.data_ptr<T>();
      fold_weight_grad<KN, T>(g, padded.data_ptr<T>(), [&](int64_t blk) {
        return [=, &g](int64_t n, int64_t h, int64_t wc, const T*) {
          return load<T>(dp + ((n * g.H + h) * g.W + wc) * g.C + blk * L);
        };
      }, dcw, dcb);
    };
    with_patch_size(img, run);
  });
  return {dcw, dcb};
}

// The GIL is released: metaml's task threads run whole tasks concurrently, and each calls these.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, py::call_guard<py::gil_scoped_release>(),
        "(x, weight, bias, eps) -> (out, argmax, mean, biased var, invstd)");
  m.def("backward", &backward, py::call_guard<py::gil_scoped_release>(),
        "(grad_out, out, argmax, x, mean, invstd, weight) -> (grad_x, grad_weight, grad_bias)");
  m.def("first_conv", &first_conv, py::call_guard<py::gil_scoped_release>(),
        "(images, conv weight, conv bias) -> (the convolution's output,)");
  m.def("first_conv_weight_grad", &first_conv_weight_grad, py::call_guard<py::gil_scoped_release>(),
        "(images, grad of the convolution's output) -> (grad conv weight, grad conv bias)");
  m.def("double_backward", &double_backward, py::call_guard<py::gil_scoped_release>(),
        "(grad grad_x, grad grad_weight, grad grad_bias, grad_out, out, argmax, x, mean, invstd, weight) -> "
        "(grad grad_out, grad x, grad weight)");
  m.def("conv_forward", &conv_forward, py::call_guard<py::gil_scoped_release>(),
        "(images, conv weight, conv bias, weight, bias, eps) -> (out, argmax, mean, biased var, invstd)");
  m.def("conv_backward", &conv_backward, py::call_guard<py::gil_scoped_release>(),
        "(grad_out, out, argmax, images, conv weight, conv bias, mean, invstd, weight) -> "
        "(grad conv weight, grad conv bias, grad weight, grad bias)");
}
