// metaml's fused CPU kernel for conv4's blocks: training-mode BatchNorm (statistics of the
// batch itself) -> 2x2 max-pooling (stride 2, floor) -> ReLU, on channels-last (NHWC) tensors.
//
// Why: in a conv4 step on the CPU these three run as separate memory-bound kernels, each
// reading and writing the full-size activation (the 64 MiB of a 320x64x28x28 episode), and
// max-pooling's backward zero-fills one more. Fused, the forward reads the activation twice
// (statistics, then normalise-and-pool) and writes only the pooled quarter and a byte per
// pooled value for the window's argmax; the backward reads it once for BatchNorm's two sums
// (which only the pooled positions contribute to) and once to write the gradient.
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
      const T gl = gg[c];
      const T gv = o[c] > T(0) ? gl : T(0);
      const T k = T(m[c]);
      const T a0 = x0[c], a1 = x1[c], a2 = x2[c], a3 = x3[c];
      const T xv = k == T(0) ? a0 : (k == T(1) ? a1 : (k == T(2) ? a2 : a3));
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
    for (int64_t c = 0; c < C; ++c) {
      double s = 0, q = 0;
      for (int64_t k = 0; k < chunks; ++k) { s += ps[k * C + c]; q += pq[k * C + c]; }
      const double m = s / rows, var = std::max(q / rows - m * m, 0.0), mean = shift[c] + m;
      const double inv = 1.0 / std::sqrt(var + eps), gam = wp ? double(wp[c]) : 1.0;
      a[c] = T(gam * inv);
      b[c] = T((bp ? double(bp[c]) : 0.0) - mean * gam * inv);
      mean_t.data_ptr<T>()[c] = T(mean);
      var_t.data_ptr<T>()[c] = T(var);
      invstd_t.data_ptr<T>()[c] = T(inv);
    }
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
    for (int64_t c = 0; c < C; ++c) {
      double S1 = 0, S2 = 0;
      for (int64_t p = 0; p < P; ++p) { S1 += s1[p * C + c]; S2 += s2[p * C + c]; }
      S2 *= double(inv[c]);  // the sum of grad * xhat
      db.data_ptr<T>()[c] = T(S1);
      dw.data_ptr<T>()[c] = T(S2);
      const double k = (wp ? double(wp[c]) : 1.0) * double(inv[c]);
      // dx = k * (dy - S1/M - xhat * S2/M), xhat = (x - mean) * inv
      K[c] = T(k);
      A[c] = T(-k * double(inv[c]) * S2 / M);
      B[c] = T(-k * S1 / M + k * double(mean[c]) * double(inv[c]) * S2 / M);
    }
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

// The GIL is released: metaml's task threads run whole tasks concurrently, and each calls these.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, py::call_guard<py::gil_scoped_release>(),
        "(x, weight, bias, eps) -> (out, argmax, mean, biased var, invstd)");
  m.def("backward", &backward, py::call_guard<py::gil_scoped_release>(),
        "(grad_out, out, argmax, x, mean, invstd, weight) -> (grad_x, grad_weight, grad_bias)");
}
