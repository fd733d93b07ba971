"""Our MoE layer computes exactly what transformers' sparse MoE blocks compute (fp32, identical
weights, copied in both directions):

    Mixtral     softmax top-2, the two weights renormalised to sum 1
    Qwen2-MoE   softmax top-k without renormalisation (norm_topk_prob=False), plus a shared expert
                scaled by sigmoid(x·w_gate)

transformers 5 stores routed experts fused: gate_up_proj [E, 2F, D] = [w1; w3] (gate first),
down_proj [E, D, F] = w2. Outputs, router logits and gradients are compared; the aux and z losses
are off so that the gradients are those of the block output alone.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.configuration_mixtral import MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402

from models.moe import MoE  # noqa: E402
from models.config import MoEConfig  # noqa: E402

D, E, F, S = 32, 6, 24, 40  # model dim, experts, expert ffn, shared-expert ffn
TOL = dict(rtol=1e-5, atol=1e-6)


def ours(top_k: int, renormalize: bool, shared: bool, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=E, top_k=top_k, expert_ffn_dim=F, renormalize=renormalize,
                    num_shared_experts=int(shared), shared_expert_ffn_dim=S if shared else 0,
                    shared_expert_gate=shared, aux_loss_coeff=0.0, z_loss_coeff=0.0)
    layer = MoE(D, cfg)
    layer.init_weights(std=0.2, out_std=0.2)  # large enough that no two experts tie
    if shared:
        torch.nn.init.normal_(layer.shared_expert_gate.weight, std=0.2)
    return layer


def mixtral(top_k: int, implementation: str = "eager") -> MixtralSparseMoeBlock:
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                        num_experts_per_tok=top_k, router_jitter_noise=0.0, hidden_act="silu")
    cfg._experts_implementation = implementation
    return MixtralSparseMoeBlock(cfg)


def qwen2(top_k: int, implementation: str = "eager") -> Qwen2MoeSparseMoeBlock:
    cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F, shared_expert_intermediate_size=S,
                         num_experts=E, num_experts_per_tok=top_k, norm_topk_prob=False,
                         hidden_act="silu")
    cfg._experts_implementation = implementation
    return Qwen2MoeSparseMoeBlock(cfg)


# Weight maps. Ours: router.gate [E, D]; experts.w1/w3 [E, F, D], w2 [E, D, F]; shared experts
# a SwiGLU FeedForward (w1 gate, w3 up, w2 down) and shared_expert_gate [1, D].
def routed_pairs(layer: MoE, block) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ours, hf) tensor pairs; the fused gate_up_proj is split into views [:F] and [F:]."""
    ex = block.experts
    return [(layer.router.gate.weight, block.gate.weight),
            (layer.experts.w1_EFD, ex.gate_up_proj[:, :F]), (layer.experts.w3_EFD, ex.gate_up_proj[:, F:]),
            (layer.experts.w2_EDF, ex.down_proj)]


def shared_pairs(layer: MoE, block) -> list[tuple[torch.Tensor, torch.Tensor]]:
    sh, hs = layer.shared_experts, block.shared_expert
    return [(sh.w1.weight, hs.gate_proj.weight), (sh.w3.weight, hs.up_proj.weight),
            (sh.w2.weight, hs.down_proj.weight),
            (layer.shared_expert_gate.weight, block.shared_expert_gate.weight)]


@torch.no_grad()
def copy(pairs, to_hf: bool, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for a, b in pairs:
        src, dst = (a, b) if to_hf else (b, a)
        if not to_hf:  # HF blocks start from empty/zero weights: give them random ones first
            src.copy_(torch.randn(src.shape, generator=gen) * 0.2)
        dst.copy_(src)


def forward_backward(module, x, dy):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad


def grads(pairs, side: int) -> list[torch.Tensor]:
    """Grads of the ours (0) or hf (1) side; HF's fused grad is sliced like its weight."""
    out = []
    for pair in pairs:
        t = pair[side]
        if side == 1 and t._base is not None:  # a view of gate_up_proj
            full = t._base.grad
            out.append(full[:, :F] if t.data_ptr() == t._base.data_ptr() else full[:, F:])
        else:
            out.append(t.grad)
    return out


def inputs(seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 7, D, generator=gen), torch.randn(3, 7, D, generator=gen)


def check(layer: MoE, block, pairs, x, dy):
    y_ours, dx_ours = forward_backward(layer.train(), x, dy)
    y_hf, dx_hf = forward_backward(block.train(), x, dy)
    torch.testing.assert_close(y_ours, y_hf, **TOL)
    torch.testing.assert_close(dx_ours, dx_hf, **TOL)
    for g_ours, g_hf in zip(grads(pairs, 0), grads(pairs, 1)):
        torch.testing.assert_close(g_ours, g_hf, **TOL)
    x_TD = x.reshape(-1, D)
    logits_hf = block.gate(x_TD)[0]
    torch.testing.assert_close(layer.router(x_TD).logits_TE, logits_hf, **TOL)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("to_hf", [True, False], ids=["ours_to_hf", "hf_to_ours"])
def test_mixtral_block_parity(to_hf, implementation):
    layer = ours(top_k=2, renormalize=True, shared=False)
    block = mixtral(top_k=2, implementation=implementation)
    pairs = routed_pairs(layer, block)
    copy(pairs, to_hf)
    check(layer, block, pairs, *inputs())


@pytest.mark.parametrize("top_k", [2, 4])
@pytest.mark.parametrize("to_hf", [True, False], ids=["ours_to_hf", "hf_to_ours"])
def test_qwen2_moe_block_parity_no_renorm_and_gated_shared_expert(to_hf, top_k):
    layer, block = ours(top_k=top_k, renormalize=False, shared=True), qwen2(top_k=top_k)
    pairs = routed_pairs(layer, block) + shared_pairs(layer, block)
    copy(pairs, to_hf)
    check(layer, block, pairs, *inputs())
    # The no-renorm setting matters: the chosen weights do not sum to 1.
    route = layer.router(inputs()[0].reshape(-1, D))
    assert route.topk_weight_TK.sum(-1).max() < 0.999


def test_parity_fails_when_renormalisation_differs():
    """Guards the test itself: a Mixtral block against a non-renormalised layer must differ."""
    layer, block = ours(top_k=2, renormalize=False, shared=False), mixtral(top_k=2)
    copy(routed_pairs(layer, block), to_hf=True)
    x, dy = inputs()
    assert not torch.allclose(forward_backward(layer, x, dy)[0], forward_backward(block, x, dy)[0], **TOL)
