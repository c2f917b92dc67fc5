// Persistent tile scheduler for the FP8 GEMM family.
//
// Every CTA walks the linear tile indices blockIdx.x, blockIdx.x + gridDim.x, ... and a small
// layout policy turns each index into one output tile and the coordinates of its operands in
// the 2-D TMA views. The mainloop and the epilogue never see which layout they serve:
//
//   dense       A [M, K],         B [N, K],       D [M, N]
//   contiguous  A [M_sum, K],     B [E*N, K],     D [M_sum, N]    m_indices [M_sum] (-1: padding)
//   masked      A [E*M_max, K],   B [E*N, K],     D [E*M_max, N]  masked_m [E]
//
// Activation scales are viewed as 2-D [outer = (E*)K/128, inner = M (or M_max)] (MN-major),
// weight scales as [E*ceil(N/128), K/128].
#pragma once

#include "ptx.cuh"

namespace moe_fp8 {

enum GemmLayout : int { kLayoutDense = 0, kLayoutContiguous = 1, kLayoutMasked = 2 };

// Runtime arguments shared by the producer and the math warpgroups (by value, in param space).
struct GemmParams {
  int m;               // dense: M; contiguous: M_sum; masked: M_max
  int num_experts;     // grouped layouts; 1 for dense
  const int* g_layout; // contiguous: m_indices [M_sum]; masked: masked_m [E]; dense: unused
  const float* g_sb;   // weight scales [E * ceil(N/128), K/128] fp32
  void* g_d;           // bf16 output, for the predicated (partially masked) store path
};

// One output tile of kBlockM x kBlockN and where its operands live.
struct Tile {
  int m_row;       // first row of the tile in the 2-D views of A and D
  int sa_m;        // first row in the scale view's inner (M) dimension
  int sa_k;        // the scale view's outer coordinate of K block 0
  int n0;          // first output column
  int b_row;       // first row of the tile's B in the [E*N, K] view
  int sb_row;      // row of the sb view holding column block n0 / 128
  int sb_rows_end; // one past the last sb row of this expert (guards the straddling block)
  int rows_valid;  // rows of the tile that may be written, counted from m_row
};

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Linear index inside one [num_m x kNumNBlocks] problem -> (m block, n block). Runs of kGroupN
// n blocks are swept for every m block before moving on, so the CTAs resident at one time share
// a band of B (kGroupN * kBlockN rows) and a few m blocks of A in L2.
template <int kNumNBlocks, int kGroupN>
__device__ __forceinline__ void raster(int idx, int num_m, int& mb, int& nb) {
  const int tiles_per_group = num_m * kGroupN;
  const int group = idx / tiles_per_group;
  const int first_n = group * kGroupN;
  const int n_in_group = min(kGroupN, kNumNBlocks - first_n);
  const int r = idx - group * tiles_per_group;
  mb = r / n_in_group;
  nb = first_n + r - mb * n_in_group;
}

enum class TileStatus { kDone, kSkip, kReady };

template <int kLayout, int kN, int kK, int kBlockM, int kBlockN, int kGroupN>
struct TileScheduler {
  static constexpr int kNumNBlocks = ceil_div(kN, kBlockN);
  static constexpr int kNumKBlocks = kK / 128;
  static constexpr int kSbRowsPerExpert = ceil_div(kN, 128);

  const GemmParams& params;
  int next_idx;
  // masked layout: the expert holding next_idx and the first linear index of that expert
  int expert = 0;
  int expert_base = 0;

  __device__ explicit TileScheduler(const GemmParams& p) : params(p), next_idx(blockIdx.x) {}

  __device__ __forceinline__ void fill_n(Tile& t, int nb, int e) const {
    t.n0 = nb * kBlockN;
    t.b_row = e * kN + t.n0;
    t.sb_row = e * kSbRowsPerExpert + t.n0 / 128;
    t.sb_rows_end = (e + 1) * kSbRowsPerExpert;
  }

  __device__ __forceinline__ int masked_rows(int e) const {
    return min(max(__ldg(params.g_layout + e), 0), params.m);  // clamp untrusted device counts
  }

  __device__ TileStatus get(int idx, Tile& t) {
    if constexpr (kLayout == kLayoutMasked) {
      // Experts hold ceil(masked_m / kBlockM) * kNumNBlocks tiles each, enumerated densely so
      // that empty experts cost nothing and every CTA gets an even share of the real work.
      while (expert < params.num_experts) {
        const int tiles = ceil_div(masked_rows(expert), kBlockM) * kNumNBlocks;
        if (idx < expert_base + tiles) break;
        expert_base += tiles;
        ++expert;
      }
      if (expert >= params.num_experts) return TileStatus::kDone;
      const int rows = masked_rows(expert);
      int mb, nb;
      raster<kNumNBlocks, kGroupN>(idx - expert_base, ceil_div(rows, kBlockM), mb, nb);
      t.m_row = expert * params.m + mb * kBlockM;
      t.sa_m = mb * kBlockM;
      t.sa_k = expert * kNumKBlocks;
      t.rows_valid = rows - mb * kBlockM;
      fill_n(t, nb, expert);
      return TileStatus::kReady;
    } else {
      const int num_m = ceil_div(params.m, kBlockM);
      if (idx >= num_m * kNumNBlocks) return TileStatus::kDone;
      int mb, nb;
      raster<kNumNBlocks, kGroupN>(idx, num_m, mb, nb);
      int e = 0;
      if constexpr (kLayout == kLayoutContiguous) {
        // m_indices is constant within every 128-row segment (kBlockM divides 128): one read
        // classifies the whole tile; padding tiles issue no loads, no MMA and no stores.
        e = __ldg(params.g_layout + mb * kBlockM);
        if (e < 0 || e >= params.num_experts) return TileStatus::kSkip;
      }
      t.m_row = mb * kBlockM;
      t.sa_m = t.m_row;
      t.sa_k = 0;
      t.rows_valid = params.m - t.m_row;  // TMA clips the tail; kept for uniformity
      fill_n(t, nb, e);
      return TileStatus::kReady;
    }
  }

  // Next tile of this CTA; false when it has none left.
  __device__ bool next(Tile& t) {
    while (true) {
      const TileStatus status = get(next_idx, t);
      next_idx += gridDim.x;
      if (status == TileStatus::kReady) return true;
      if (status == TileStatus::kDone) return false;
    }
  }
};

}  // namespace moe_fp8
