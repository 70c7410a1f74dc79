// The FE-Block's training score, MaxSim, as one kernel forward and one backward, for MindSpore's Custom op of type
// "aot" on CPU (module.kernel_library builds this file with g++). It starts from the projections before their
// biases, so the heads are never concatenated, biased or split as separate passes over memory.
//
//   forward   in: u_1 .. u_L (B, H p), user bias (L, H p), v (B, H p), item bias (H p)
//             out: score (B), argmax (B, L H) int32 (its shape gives H)
//   backward  in: dscore (B), u_1 .. u_L, user bias, v, item bias, argmax
//             out: du_1 .. du_L (B, H p), duser bias (L, H p), dv (B, H p), ditem bias (H p)
//
// With the heads U_lh = u_l[h] + user bias[l, h] and V_k = v[k] + item bias[k] (p values each):
// score = sum over l, h of max over k of <U_lh, V_k>; the first maximum is the argmax (as ArgMaxWithValue), and
// a NaN product is the maximum (so NaN reaches the loss). The gradient of one term goes to its argmax only:
// dU_lh = dscore V_k*, dV_k* += dscore U_lh; each bias gradient is the sum of its heads' gradients over the rows.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

float *tensor(void **params, int k) { return static_cast<float *>(params[k]); }

// Row i's H heads of p values plus their bias, into out (H p).
inline void biased(const float *row, const float *bias, int64_t width, float *out) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) out[j] = row[j] + bias[j];
}

// Forward over the rows, for H item heads: H a template argument (1, 2, 4 or 8: the H sums of a product stay in
// registers) or 0 (any H up to kMaxHeads, read from `heads`). For each user head, eight lanes per item head are
// summed in step over the head's values (one pass over it), then reduced; the first maximum wins (a NaN product,
// once met, is kept).
constexpr int64_t kLanes = 8, kMaxHeads = 16;

template <int64_t H>
void forward_rows(int layers, const float *const *users, const float *ubias, const float *v, const float *vbias,
                  int64_t n, int64_t heads, int64_t p, float *score, int32_t *argmax) {
  const int64_t nh = H > 0 ? H : heads, width = nh * p, body = p - p % kLanes;
  std::vector<float> item(width);
  for (int64_t i = 0; i < n; ++i) {
    biased(v + i * width, vbias, width, item.data());
    float total = 0.0f;
    for (int l = 0; l < layers; ++l) {
      for (int64_t h = 0; h < nh; ++h) {
        const float *u = users[l] + i * width + h * p, *b = ubias + l * width + h * p;
        float acc[H > 0 ? H : kMaxHeads][kLanes];
        for (int64_t k = 0; k < nh; ++k) {
          for (int64_t j = 0; j < kLanes; ++j) acc[k][j] = 0.0f;
        }
        for (int64_t d = 0; d < body; d += kLanes) {
          float x[kLanes];
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) x[j] = u[d + j] + b[d + j];
          for (int64_t k = 0; k < nh; ++k) {
#pragma omp simd
            for (int64_t j = 0; j < kLanes; ++j) acc[k][j] += x[j] * item[k * p + d + j];
          }
        }
        for (int64_t w = kLanes / 2; w >= 1; w /= 2) {  // the lanes summed pairwise, all H sums in step
          for (int64_t k = 0; k < nh; ++k) {
            for (int64_t j = 0; j < w; ++j) acc[k][j] += acc[k][j + w];
          }
        }
        float best = -INFINITY;
        int32_t arg = 0;
        for (int64_t k = 0; k < nh; ++k) {
          float s = acc[k][0];
          for (int64_t d = body; d < p; ++d) s += (u[d] + b[d]) * item[k * p + d];
          if (s > best || std::isnan(s)) {
            best = s;
            arg = static_cast<int32_t>(k);  // a NaN, once taken, stays: nothing compares greater
          }
        }
        total += best;
        argmax[(i * layers + l) * nh + h] = arg;
      }
    }
    score[i] = total;
  }
}

}  // namespace

extern "C" int MaxSimForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  const int layers = nparam - 5;  // u_1 .. u_L, user bias, v, item bias -> score, argmax
  if (layers < 1 || ndims[0] != 2 || ndims[layers + 4] != 2) return 1;
  const int64_t n = shapes[0][0], width = shapes[0][1], heads = shapes[layers + 4][1] / layers, p = width / heads;
  if (heads < 1 || heads > kMaxHeads || p * heads != width) return 1;
  std::vector<const float *> users(layers);
  for (int l = 0; l < layers; ++l) users[l] = tensor(params, l);
  const float *ubias = tensor(params, layers), *v = tensor(params, layers + 1), *vbias = tensor(params, layers + 2);
  float *score = tensor(params, layers + 3);
  int32_t *argmax = static_cast<int32_t *>(params[layers + 4]);
  const auto rows = heads == 1 ? forward_rows<1> : heads == 2 ? forward_rows<2> : heads == 4 ? forward_rows<4>
                    : heads == 8 ? forward_rows<8> : forward_rows<0>;
  rows(layers, users.data(), ubias, v, vbias, n, heads, p, score, argmax);
  return 0;
}

extern "C" int MaxSimBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  const int layers = (nparam - 8) / 2;  // dscore, u_1 .. u_L, user bias, v, item bias, argmax -> L + 3 gradients
  if (layers < 1 || 2 * layers + 8 != nparam || ndims[1] != 2 || ndims[layers + 4] != 2) return 1;
  const float *dscore = tensor(params, 0), *ubias = tensor(params, layers + 1), *v = tensor(params, layers + 2),
              *vbias = tensor(params, layers + 3);
  const int32_t *argmax = static_cast<const int32_t *>(params[layers + 4]);
  const int first_out = layers + 5;
  float *dubias = tensor(params, first_out + layers), *dv = tensor(params, first_out + layers + 1),
        *dvbias = tensor(params, first_out + layers + 2);
  const int64_t n = shapes[1][0], width = shapes[1][1], heads = shapes[layers + 4][1] / layers, p = width / heads;
  if (heads < 1 || p * heads != width) return 1;
  std::memset(dubias, 0, layers * width * sizeof(float));
  std::memset(dvbias, 0, width * sizeof(float));
  std::vector<float> item(width);
  for (int64_t i = 0; i < n; ++i) {
    const float g = dscore[i];
    biased(v + i * width, vbias, width, item.data());
    float *dvi = dv + i * width;
    std::memset(dvi, 0, width * sizeof(float));
    for (int l = 0; l < layers; ++l) {
      const float *ui = tensor(params, l + 1) + i * width, *ub = ubias + l * width;
      float *dui = tensor(params, first_out + l) + i * width, *dub = dubias + l * width;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t k = argmax[(i * layers + l) * heads + h];
        const float *vk = item.data() + k * p, *uh = ui + h * p, *bh = ub + h * p;
        float *duh = dui + h * p, *dbh = dub + h * p, *dvk = dvi + k * p;
#pragma omp simd
        for (int64_t d = 0; d < p; ++d) {
          duh[d] = g * vk[d];
          dbh[d] += duh[d];
          dvk[d] += g * (uh[d] + bh[d]);
        }
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) dvbias[j] += dvi[j];
  }
  return 0;
}
