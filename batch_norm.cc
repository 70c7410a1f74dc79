// BatchNorm in training, optionally followed by ReLU, over the batch axis of a row-major (B, C) float32 matrix:
// forward and backward each one kernel of a few passes over the rows, for MindSpore's Custom op of type "aot" on
// CPU (module.fused_batch_norm builds this file with g++). Single-threaded: MindSpore runs independent kernels
// (the two towers) on its own threads at once.
//
//   forward   in: x (B, C), gamma (C), beta (C), options (2)         out: y (B, C), mean (C), var (C) (biased)
//   backward  in: dy (B, C), x, y, gamma, mean, var, options        out: dx (B, C), dgamma (C), dbeta (C)
//   options = (eps, relu): relu 1 applies ReLU to the output (the backward then reads y for its mask).
//
// z = gamma (x - mean) r + beta with r = 1 / sqrt(var + eps), y = z or max(z, 0); with g = dL/dz (dy, masked
// by y > 0 under ReLU), s = sum g and q = sum g (x - mean): dbeta = s, dgamma = r q and
// dx = gamma r (g - s / B - (x - mean) r^2 q / B).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

bool float32(int count, const char **dtypes) {
  for (int k = 0; k < count; ++k) {
    if (std::strcmp(dtypes[k], "float32") != 0 && std::strcmp(dtypes[k], "float") != 0) return false;
  }
  return true;
}

// The k-th of the op's inputs and outputs (all float32 here).
float *tensor(void **params, int k) { return static_cast<float *>(params[k]); }

}  // namespace

extern "C" int BatchNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != 7 || ndims[0] != 2 || !float32(nparam, dtypes)) return 1;
  const float *x = tensor(params, 0), *gamma = tensor(params, 1), *beta = tensor(params, 2),
              *options = tensor(params, 3);
  float *y = tensor(params, 4), *mean = tensor(params, 5), *var = tensor(params, 6);
  const int64_t n = shapes[0][0], c = shapes[0][1];
  const float low = options[1] != 0.0f ? 0.0f : -INFINITY;  // ReLU: max(z, 0); none: max(z, -inf) = z
  std::vector<float> a(c, 0.0f), b(c, 0.0f);
  for (int64_t i = 0; i < n; ++i) {  // the means, then the variances about them (two passes: no cancellation)
    const float *xi = x + i * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) a[j] += xi[j];
  }
  for (int64_t j = 0; j < c; ++j) mean[j] = a[j] / n;
  for (int64_t i = 0; i < n; ++i) {
    const float *xi = x + i * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) b[j] += (xi[j] - mean[j]) * (xi[j] - mean[j]);
  }
  for (int64_t j = 0; j < c; ++j) {  // y = a x + b, per column
    var[j] = b[j] / n;
    a[j] = gamma[j] / std::sqrt(var[j] + options[0]);
    b[j] = beta[j] - mean[j] * a[j];
  }
  for (int64_t i = 0; i < n; ++i) {
    const float *xi = x + i * c;
    float *yi = y + i * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) yi[j] = std::max(xi[j] * a[j] + b[j], low);
  }
  return 0;
}

extern "C" int BatchNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  if (nparam != 10 || ndims[0] != 2 || !float32(nparam, dtypes)) return 1;
  const float *dy = tensor(params, 0), *x = tensor(params, 1), *y = tensor(params, 2), *gamma = tensor(params, 3),
              *mean = tensor(params, 4), *var = tensor(params, 5), *options = tensor(params, 6);
  float *dx = tensor(params, 7), *dgamma = tensor(params, 8), *dbeta = tensor(params, 9);
  const int64_t n = shapes[0][0], c = shapes[0][1];
  const bool relu = options[1] != 0.0f;
  std::vector<float> s(c, 0.0f), q(c, 0.0f);
  for (int64_t i = 0; i < n; ++i) {  // g into dx, and its sums
    const float *dyi = dy + i * c, *xi = x + i * c, *yi = y + i * c;
    float *gi = dx + i * c;
    if (relu) {
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) gi[j] = yi[j] > 0.0f ? dyi[j] : 0.0f;
    } else {
      std::memcpy(gi, dyi, c * sizeof(float));
    }
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      s[j] += gi[j];
      q[j] += gi[j] * (xi[j] - mean[j]);
    }
  }
  std::vector<float> a(c), b(c), e(c);  // dx = a g + b (x - mean) + e, per column
  for (int64_t j = 0; j < c; ++j) {
    const float r = 1.0f / std::sqrt(var[j] + options[0]);
    dbeta[j] = s[j];
    dgamma[j] = r * q[j];
    a[j] = gamma[j] * r;
    b[j] = -a[j] * r * r * q[j] / n;
    e[j] = -a[j] * s[j] / n;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float *xi = x + i * c;
    float *gi = dx + i * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) gi[j] = a[j] * gi[j] + b[j] * (xi[j] - mean[j]) + e[j];
  }
  return 0;
}
