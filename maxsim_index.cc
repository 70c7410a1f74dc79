// MaxSim of one user against the item index, for serving (scorer.TiledIndex; built with g++ by util.build_library,
// called through ctypes). The training kernel of the same score is maxsim.cc.
//
//   score(item) = sum over the U user heads u of the max over the H item heads k of <user_u, item_k>  (p values)
//
// The index is stored in tiles of W items, (tiles, H, p, W), W the width of this CPU's vector registers in
// floats (MaxSimTileWidth: 16 with AVX-512, 8 with AVX2, 4 otherwise): value j of head k of item W t + l is at
// [t][k][j][l]. The W items of a tile then fill one register, and each product of a user value with the index
// is one broadcast multiply-add into W items' sums: no horizontal sums, the user's values are read from L1, the
// index once, in order. The sums of a chunk of user heads stay in registers; longer users take several chunks
// over the same tile (16 KB for H = 4, p = 64, W = 16: in L1). A NaN product is the maximum, as numpy.maximum
// (the reference, scorer.maxsim).
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

namespace {

#if defined(__AVX512F__)
constexpr int64_t kTile = 16;
constexpr int kChunk = 12;  // 12 sums + 12 maxima + the index value: 25 of 32 registers
#elif defined(__AVX__)
constexpr int64_t kTile = 8;
constexpr int kChunk = 6;   // 6 + 6 + the index value and a broadcast user value: 14 of 16 registers
#else
constexpr int64_t kTile = 4;
constexpr int kChunk = 6;
#endif
typedef float Lanes __attribute__((vector_size(kTile * sizeof(float))));
typedef float Unaligned __attribute__((vector_size(kTile * sizeof(float)), aligned(sizeof(float))));  // for loads

// The sum over C user heads (C p values from `user`) of the max over the item heads, for one tile's W items.
template <int C>
Lanes chunk_scores(const float *user, int64_t p, const float *tile, int64_t heads) {
  Lanes best[C] = {};
  for (int64_t k = 0; k < heads; ++k) {
    const Unaligned *item = reinterpret_cast<const Unaligned *>(tile + k * p * kTile);
    Lanes sum[C] = {};
    for (int64_t j = 0; j < p; ++j) {
      const Lanes x = item[j];
      for (int c = 0; c < C; ++c) sum[c] += user[c * p + j] * x;
    }
    for (int c = 0; c < C; ++c) best[c] = k == 0 ? sum[c] : ((sum[c] > best[c]) | (sum[c] != sum[c])) ? sum[c] : best[c];
  }
  Lanes total = {};
  for (int c = 0; c < C; ++c) total += best[c];
  return total;
}

using ChunkFn = Lanes (*)(const float *, int64_t, const float *, int64_t);

template <int... C>
constexpr std::array<ChunkFn, sizeof...(C)> chunk_table(std::integer_sequence<int, C...>) {
  return {&chunk_scores<C + 1>...};
}

constexpr auto kChunks = chunk_table(std::make_integer_sequence<int, kChunk>{});

// All U user heads against one tile: W scores into out.
inline void tile_scores(const float *user, int64_t users, int64_t p, const float *tile, int64_t heads, float *out) {
  Lanes total = {};
  for (int64_t u = 0; u < users; u += kChunk) {
    total += kChunks[std::min<int64_t>(kChunk, users - u) - 1](user + u * p, p, tile, heads);
  }
  std::memcpy(out, &total, sizeof total);
}

}  // namespace

extern "C" {

// W, the items per tile.
int64_t MaxSimTileWidth() { return kTile; }

// Tiles [first, last) of a tiled index (tiles, H, p, W) against user (U, p): W scores per tile into out.
void MaxSimTiles(const float *user, int64_t users, int64_t p, const float *tiles, int64_t heads, int64_t first,
                 int64_t last, float *out) {
  const int64_t size = heads * p * kTile;
  for (int64_t t = first; t < last; ++t) tile_scores(user, users, p, tiles + t * size, heads, out + t * kTile);
}

}  // extern "C"
