"""The layer under torch.compile: the masked (decode) path traces as one graph; the contiguous
path breaks once, at the host read of M_sum (the layout's size), and matches eager."""
import torch

from moe_fp8.layers import MoE, MoEConfig


@torch.no_grad()
def test_masked_path_compiles_fullgraph(gen):
    moe = MoE(MoEConfig.tiny(), seed=1)
    x = torch.randn(16, moe.cfg.hidden_size, generator=gen).bfloat16()
    step = torch.compile(lambda x: moe.forward_masked(x, max_tokens_per_expert=16),
                         backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(step(x), moe.forward_masked(x), rtol=0, atol=0)


@torch.no_grad()
def test_contiguous_path_compiles(gen):
    moe = MoE(MoEConfig.tiny(), seed=2)
    x = torch.randn(24, moe.cfg.hidden_size, generator=gen).bfloat16()
    torch.testing.assert_close(torch.compile(moe, backend="aot_eager")(x), moe(x), rtol=0, atol=0)
