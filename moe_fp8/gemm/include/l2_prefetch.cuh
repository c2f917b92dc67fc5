// The decode step's gate-up weights brought into L2 before the gate-up GEMM asks for them.
//
// From ~8 tokens on every local expert holds rows, and the decode graph's router branch (router
// GEMM, route, masked index, permute) runs 15-37 us before the routed gate-up GEMM starts, with
// only the shared expert's weights streaming beside it: HBM at ~1.6-1.9 of ~3 TB/s (H100
// timelines, 2026-12-06). This kernel runs on a graph branch of its own and prefetches the first
// kBlocks K blocks of the B tiles that the fused SwiGLU GEMM's first wave reads, on the guess that
// every expert holds one row block: tile t is expert t / tilesPerExpert, pair p = t %
// tilesPerExpert, i.e. gate rows [e * rowsPerExpert + 128 p, +128) and up rows
// [e * rowsPerExpert + rowsPerExpert / 2 + 128 p, +128) of B [E * 2I, K] (scheduler.cuh
// kPairedHalves). K-block-major: K block 0 of every tile first. A wrong guess (an empty expert
// shifts the order) costs bandwidth only: a prefetch never changes a value.
#pragma once

#include "pdl.cuh"
#include "ptx.cuh"

namespace moe_fp8 {

constexpr int kPrefetchThreads = 128;

// tma_b: B's descriptor with 128-row x 128-byte boxes (the fused SwiGLU GEMM's). One prefetch per
// (K block, tile, half); the host sizes the grid to cover numTiles * 2 * kBlocks of them.
__global__ void __launch_bounds__(kPrefetchThreads) prefetch_paired_b_kernel(
    const __grid_constant__ ptx::TmaDesc tma_b, int numTiles, int tilesPerExpert,
    int rowsPerExpert, int kBlocks) {
  pdl::begin();  // before any global access (pdl.cuh); B is never written in the graph anyway
  const int halves = 2 * numTiles;
  for (int i = blockIdx.x * kPrefetchThreads + threadIdx.x; i < halves * kBlocks;
       i += gridDim.x * kPrefetchThreads) {
    const int kb = i / halves, tile = i % halves / 2, up = i % 2;
    const int expert = tile / tilesPerExpert, pair = tile % tilesPerExpert;
    const int row = expert * rowsPerExpert + up * (rowsPerExpert / 2) + 128 * pair;
    ptx::tma_prefetch_2d_evict_last(&tma_b, kb * 128, row);
  }
}

}  // namespace moe_fp8
