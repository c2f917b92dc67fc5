"""Expert parallelism on 2 GPUs over NCCL: prefill, and the decode step captured in ONE CUDA graph.

Two ways to run (both need 2 Hopper GPUs, or one with ``MOE_FP8_EP_GPU_WORLD=1``;
``NCCL_NVLS_ENABLE=0`` is forced before the group starts):

    python -m pytest -q -rA tests/test_ep_gpu.py             # spawns the 2 ranks itself
    python -m torch.distributed.run --nproc-per-node 2 tests/test_ep_gpu.py

Every rank compares its EP output with the single-GPU layer (same weights) on its own card, fed
the same rows as its EP router (tokens are independent; equal router GEMM shapes keep cuBLAS from
flipping a near-tie in the top-k). The decode graph is built by ``MoE.decode_runner`` (two eager warm-up steps, which
also set up NCCL's peer connections, then the capture); a capture that synchronised with the host
would fail, so a replay that matches the reference proves the step is sync-free. Graphs are
freed before ``destroy_process_group`` (DEVICE_FACTS: teardown hung with a live graph).

``MOE_FP8_EP_GPU_TEST_ON_CPU=1`` runs the same cases on CPU/gloo (eager decode, a smaller decode
config) so this file's own machinery is checked where no GPU is.
"""
from __future__ import annotations

import functools
import gc
import os
import statistics
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_ep import (assert_bf16_close, build_pair, check_case, fake_experts_contiguous,  # noqa: E402
                     fake_experts_masked, init_group, oracle, random_routing, run_cases,
                     run_spawned, shard_rows, tiny_cfg)

# MOE_FP8_EP_GPU_WORLD=1: the same cases on one GPU, one NCCL rank (the NCCL collectives, the graph
# capture with them and the EP layer's kernels, where no 2-GPU machine is lent; nothing crosses
# a link, so it proves no transfer between cards)
kWorld = int(os.environ.get("MOE_FP8_EP_GPU_WORLD", "2"))
kGpuJobTimeoutS = 420  # includes JIT compilation of the kernels the layers need (cache cold)
kOnCpu = os.environ.get("MOE_FP8_EP_GPU_TEST_ON_CPU", "0") not in ("", "0")
pytestmark = [] if kOnCpu else pytest.mark.gpu
kDiffBound = 1e-4  # calc_diff EP vs one GPU; a lost/doubled expert contribution gives >= 1e-2


def enough_hoppers() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= kWorld and \
        all(torch.cuda.get_device_capability(i) == (9, 0) for i in range(kWorld))


def decode_cfg(device):
    """The issue's decode target: 16 experts (8 per rank), DeepSeek-V3 widths (H 7168, I 2048,
    top-8); on the CPU mirror a small stand-in with the same expert split."""
    from moe_fp8.layers import MoEConfig
    if device.type == "cuda":
        return MoEConfig.deepseek_v3(num_experts=16)
    return MoEConfig.tiny(hidden_size=384, top_k=8, n_group=4, topk_group=4)


def close_to_reference(y, y_ref, what: str) -> float:
    from moe_fp8.gemm import calc_diff
    assert y.shape == y_ref.shape and torch.isfinite(y.float()).all(), f"{what}: shape/finite"
    diff = calc_diff(y.float(), y_ref.float()) if y.numel() else 0.0
    assert diff < kDiffBound, f"{what}: calc_diff {diff:.3g} >= {kDiffBound}"
    return diff


def shared_randn(rows: int, hidden: int, seed: int, device) -> torch.Tensor:
    """The same bf16 tokens on every rank (CPU generator, then moved)."""
    return torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed)).bfloat16().to(device)


def replay_us(runner, repeats: int = 50) -> float:
    """Median time of one graph replay (the whole EP decode step) in microseconds."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


# ============================================================================ cases (every rank)

def gpu_prefill_tiny(rank, world, group, device):
    cfg = tiny_cfg()
    ref, ep = build_pair(cfg, group, device)
    counts = [37, 1]
    x_all = shared_randn(sum(counts), cfg.hidden_size, 1, device)
    x = shard_rows(x_all, counts, rank)
    return {"calc_diff": close_to_reference(ep(x), ref(x), "prefill tiny")}


def gpu_prefill_skewed(rank, world, group, device):
    cfg = tiny_cfg()
    ref, ep = build_pair(cfg, group, device, skew=True)  # rank 1's experts receive nothing
    counts = [29, 0]
    x_all = shared_randn(sum(counts), cfg.hidden_size, 2, device)
    x = shard_rows(x_all, counts, rank)
    close_to_reference(ep(x), ref(x), "prefill skewed")


def gpu_dispatch_oracle(rank, world, group, device):
    """Dispatcher alone (fake experts): the NCCL byte paths, both combine dtypes, masked + num_valid."""
    from moe_fp8.layers.dispatch.torch_dist import TorchDistDispatcher
    from moe_fp8.layers.permute import quantize_tokens
    cfg = tiny_cfg()
    gen = torch.Generator().manual_seed(5)
    counts, tokens = [40, 3], 9
    x_all = torch.randn(sum(counts), cfg.hidden_size, generator=gen).bfloat16()
    idx_all, w_all = random_routing(sum(counts), cfg, gen, invalid_every=7)
    x, idx, w = (shard_rows(t, counts, rank).to(device) for t in (x_all, idx_all, w_all))
    xq, xs = quantize_tokens(x)
    expected = oracle(xq.cpu(), xs.cpu(), idx.cpu(), w.cpu())
    for combine_dtype, ulps in ((torch.float32, 1.0), (None, 4.0)):
        disp = TorchDistDispatcher(cfg, group, combine_dtype=combine_dtype)
        layout, handle = disp.dispatch_contiguous((xq, xs), idx, w)
        y = disp.combine_contiguous(fake_experts_contiguous(layout, disp.expert_offset), handle)
        assert_bf16_close(y.cpu(), expected, f"contiguous {combine_dtype}", ulps)
    # masked: static T = 9 on both ranks, 9 and 4 live tokens, num_valid as a device scalar
    x_all = torch.randn(kWorld * tokens, cfg.hidden_size, generator=gen).bfloat16()
    idx_all, w_all = random_routing(kWorld * tokens, cfg, gen)
    x, idx, w = (shard_rows(t, [tokens] * kWorld, rank).to(device) for t in (x_all, idx_all, w_all))
    xq, xs = quantize_tokens(x)
    live = [tokens, 4][rank]
    layout, handle = disp.dispatch_masked((xq, xs), idx, w, max_tokens_per_expert=disp.max_tokens_per_expert(tokens),
                                          num_valid_tokens=torch.tensor(live, device=device))
    y = disp.combine_masked(fake_experts_masked(layout, disp.expert_offset), handle)
    assert_bf16_close(y[:live].cpu(), oracle(xq.cpu(), xs.cpu(), idx.cpu(), w.cpu())[:live], "masked", 4.0)
    assert (y[live:] == 0).all()


def _decode_steps(rank, runner, ref, steps, device, what):
    diffs = []
    for seed, counts in enumerate(steps):
        x_all = shared_randn(sum(counts), ref.cfg.hidden_size, 10 + seed, device)
        y = runner(shard_rows(x_all, counts, rank)).clone()
        # the reference routes the runner's whole static batch: same router GEMM shape, same routing
        y_ref = ref(runner.x)[:counts[rank]]
        diffs.append(close_to_reference(y, y_ref, f"{what} {counts}"))
    return max(diffs)


def gpu_decode_graph_tiny(rank, world, group, device):
    cfg = tiny_cfg()
    ref, ep = build_pair(cfg, group, device)
    runner = ep.decode_runner(16)
    assert (runner.graph is not None) == (device.type == "cuda")
    diff = _decode_steps(rank, runner, ref, ([16, 3], [1, 16], [0, 5], [16, 16]), device, "decode tiny")
    del runner
    return {"calc_diff": diff}


def gpu_decode_graph_dsv3(rank, world, group, device):
    """The issue's target: 128 tokens per rank, 8 of 16 experts per rank, H 7168, one graph."""
    cfg = decode_cfg(device)
    ref, ep = build_pair(cfg, group, device)
    max_tokens = 128 if device.type == "cuda" else 16
    runner = ep.decode_runner(max_tokens)
    diff = _decode_steps(rank, runner, ref, ([max_tokens, max_tokens], [5, max_tokens * 3 // 5], [1, 0]),
                         device, "decode dsv3")
    info = {"calc_diff": diff}
    if runner.graph is not None:
        runner.x.normal_()
        runner.num_valid.fill_(max_tokens)
        info["replay_us"] = round(replay_us(runner), 1)
    del runner
    if device.type == "cuda":
        torch.cuda.synchronize()
    return info


def gpu_prefill_dsv3(rank, world, group, device):
    cfg = decode_cfg(device)
    ref, ep = build_pair(cfg, group, device)
    counts = [512, 384] if device.type == "cuda" else [24, 9]
    x_all = shared_randn(sum(counts), cfg.hidden_size, 3, device)
    x = shard_rows(x_all, counts, rank)
    return {"calc_diff": close_to_reference(ep(x), ref(x), "prefill dsv3")}


def gpu_send_side_kernels(rank, world, group, device):
    """The prefill's send side on the ep_send kernels == its torch ops (bit for bit: counts every
    rank receives, send order, source index, record payloads) at DeepSeek-V3 routing (256
    experts, top-8, H 7168; 4096 / 1000 tokens, -1 slots), then the dispatcher oracle with them on."""
    from moe_fp8.layers import MoEConfig
    from moe_fp8.layers.dispatch.torch_dist import TorchDistDispatcher
    from moe_fp8.layers.permute import quantize_tokens
    from kernel_checks import env_switch
    cfg = MoEConfig.deepseek_v3() if device.type == "cuda" else tiny_cfg()
    disp = TorchDistDispatcher(cfg, group)
    counts = [4096, 1000] if device.type == "cuda" else [40, 7]
    gen = torch.Generator().manual_seed(21)
    idx_all, w_all = random_routing(sum(counts), cfg, gen, invalid_every=11)
    x_all = torch.randn(sum(counts), cfg.hidden_size, generator=gen).bfloat16()
    x, idx, w = (shard_rows(t, counts, rank).to(device) for t in (x_all, idx_all, w_all))
    xq, xs = quantize_tokens(x)
    want = disp._send_side_torch((xq, xs), idx, w)
    with env_switch("MOE_FP8_FUSED_EP", "1"):
        fused, _ = disp._fused_send_inputs((xq, xs), idx, w)
        assert (fused is not None) == (device.type == "cuda")
        got = disp._send_side_fused(*fused) if fused is not None else disp._send_side_torch((xq, xs), idx, w)
    for side in (want, got):
        side[1].wait()
    assert torch.equal(got[0], want[0]), "counts received"
    sends = int(want[0][rank, cfg.num_experts + 1:].sum())
    assert torch.equal(got[4][:sends], want[4][:sends]), "send order"
    assert torch.equal(got[5].slot_row, want[5].slot_row), "source rows"
    assert torch.equal(got[5].slot_weight, want[5].slot_weight), "source weights"
    fmt = disp.row_format
    payload = fmt.payload_bytes
    assert torch.equal(got[3][:, :payload], want[3][:, :payload]), "records"
    with env_switch("MOE_FP8_FUSED_EP", "1"):
        gpu_dispatch_oracle(rank, world, group, device)
    return {"sends": sends}


# NOTE: the skewed case (a rank with no tokens, receiving nothing: zero-byte NCCL splits) runs
# last, so that if it ever hangs (NCCL's watchdog aborts after kCollectiveTimeoutS) the others
# have already reported.
GPU_CASES = {fn.__name__: fn for fn in (gpu_prefill_tiny, gpu_dispatch_oracle, gpu_decode_graph_tiny,
                                        gpu_decode_graph_dsv3, gpu_prefill_dsv3, gpu_send_side_kernels,
                                        gpu_prefill_skewed)}


# ============================================================================ launchers

def _device(rank: int) -> torch.device:
    if kOnCpu:
        return torch.device("cpu")
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def _finish() -> None:
    gc.collect()  # graphs first (DEVICE_FACTS: destroy_process_group hung with one alive)
    if torch.cuda.is_available() and not kOnCpu:
        torch.cuda.synchronize()
    dist.destroy_process_group()


def _gpu_worker(rank, world, store, result_dir):
    device = _device(rank)
    init_group("gloo" if kOnCpu else "nccl", rank, world, store,
               device_id=None if kOnCpu else device)
    run_cases(GPU_CASES, rank, result_dir, dist.group.WORLD, device)
    _finish()


@functools.lru_cache(maxsize=None)
def _gpu_job():
    return run_spawned(_gpu_worker, kWorld, timeout_s=kGpuJobTimeoutS)


@pytest.mark.skipif(not (kOnCpu or enough_hoppers()), reason=f"needs {kWorld} Hopper GPUs")
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_ep_nccl(case):
    job = _gpu_job()
    check_case(job, case)
    for rank, results in enumerate(job[0]):
        print(f"rank {rank} {case}: {results[case].get('info')} ({results[case]['seconds']} s)")


def _main_torchrun() -> int:
    """Entry point under torchrun: env:// rendezvous, same cases, a line per case and rank."""
    import json
    rank = int(os.environ["RANK"])
    device = _device(int(os.environ.get("LOCAL_RANK", rank)))
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    dist.init_process_group("gloo" if kOnCpu else "nccl", **({} if kOnCpu else {"device_id": device}))
    with tempfile.TemporaryDirectory() as tmp:
        run_cases(GPU_CASES, rank, tmp, dist.group.WORLD, device)  # exits 1 on the first failure
        with open(os.path.join(tmp, f"rank{rank}.json")) as f:
            for name, result in json.load(f).items():
                print(f"rank {rank} {name}: ok {result.get('info')} ({result['seconds']} s)", flush=True)
    _finish()
    return 0


if __name__ == "__main__":
    sys.exit(_main_torchrun())
