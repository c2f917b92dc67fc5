"""One shape table shared by tests and benchmarks (TARGETS.md shapes + edge cases)."""

# (M, N, K): TARGETS.md's dense table (DeepSeek-V3 projections at decode and prefill batch sizes)
DENSE_TARGET_SHAPES = [
    (m, n, k)
    for m in (64, 128, 4096)
    for n, k in ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
]

# small shapes the CPU reference tests can afford; odd M, M = 1, N not a multiple of 128
DENSE_EDGE_SHAPES = [(1, 128, 128), (3, 144, 256), (77, 272, 384), (128, 2112 // 8 + 8, 512), (129, 16, 128)]

# (G experts, M per expert, N, K): TARGETS.md grouped-contiguous table
GROUPED_CONTIGUOUS_TARGET_SHAPES = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048),
                                    (8, 4096, 4096, 7168), (8, 4096, 7168, 2048)]

# (G experts, M_max, N, K): TARGETS.md grouped-masked table
GROUPED_MASKED_TARGET_SHAPES = [(1, 1024, 4096, 7168), (1, 1024, 7168, 2048),
                                (2, 512, 4096, 7168), (2, 512, 7168, 2048),
                                (4, 256, 4096, 7168), (4, 256, 7168, 2048)]

# uneven tokens per expert, some empty (a realistic MoE split at a small scale)
UNEVEN_EXPERT_COUNTS = [0, 1, 127, 128, 129, 0, 300, 5]
