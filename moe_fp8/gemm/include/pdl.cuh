// pdl.cuh — programmatic dependent launch (PDL), the device half.
//
// With the launch attribute PROGRAMMATIC_STREAM_SERIALIZATION (moe_fp8.gemm.jit.runtime, switch
// MOE_FP8_PDL) a kernel may start while the previous kernel of its stream is still running: its
// CTAs get resident, run their prologue, and then block in `wait_for_prerequisites` until the
// previous grid has completed and its writes are visible. That hides the launch gap and the
// prologue (barrier init, descriptor prefetch) between the short kernels of a decode step.
//
// The contract, for every kernel of this package (the runtime sets the attribute on all of them
// when the switch is on; tests/test_pdl.py checks the sources):
//   * every thread calls `wait_for_prerequisites()` before its first global-memory access, read
//     OR write (a write could race with the previous kernel's reads); only kernel parameters
//     (including __grid_constant__ TMA descriptors) and shared memory may be touched before it;
//   * `allow_dependents_to_launch()` may be called anywhere: it only lets the NEXT kernel start
//     its prologue early, and that kernel waits for this one to complete before it touches memory.
// Without the launch attribute both are no-ops (no prerequisites are pending).
#pragma once

namespace moe_fp8 {
namespace pdl {

__device__ __forceinline__ void wait_for_prerequisites() {
#ifdef __CUDA_ARCH__
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents_to_launch() {
#ifdef __CUDA_ARCH__
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Both at the top of a kernel with no prologue worth overlapping.
__device__ __forceinline__ void begin() {
  wait_for_prerequisites();
  allow_dependents_to_launch();
}

}  // namespace pdl
}  // namespace moe_fp8
