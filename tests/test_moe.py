"""FactorizedMLP: gathered dispatch equals the compute-all-and-mask reference; routing trace."""
import pytest
import torch

from factorlab.factorize import build_moe, make_partition
from factorlab.moe import factorized_layers, gated_weights, record_routing, scaled_weights, set_top_k


@pytest.mark.parametrize("mode", ["scaled", "gated"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_dispatch_equals_reference(tiny_model, mode, k):
    part = make_partition(tiny_model, 4, "random", seed=0)
    moe = build_moe(tiny_model, part, top_k=k, output_mode=mode)
    mlp = factorized_layers(moe)[0]
    for shape in [(1, 1, 64), (1, 2, 64), (3, 7, 64), (2, 33, 64)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.allclose(mlp(x), mlp.forward_reference(x), atol=1e-5)


def test_output_mode_weights():
    p = torch.tensor([[0.6, 0.2]])
    assert torch.allclose(scaled_weights(p, 4), torch.tensor([[2.0, 2.0]]))
    assert torch.allclose(gated_weights(p, 4), torch.tensor([[0.75, 0.25]]))


def test_empty_experts_and_k_at_runtime(tiny_model):
    part = make_partition(tiny_model, 4, "contiguous")
    moe = build_moe(tiny_model, part, top_k=1)
    mlp = factorized_layers(moe)[1]
    with torch.no_grad():
        mlp.router.linear.weight.zero_()
        mlp.router.linear.weight[2] = 1.0  # scores equal except expert 2 gets sum(x)
        x = torch.rand(2, 9, 64) + 0.1  # positive sums: everyone picks expert 2
        assert torch.allclose(mlp(x), mlp.forward_reference(x), atol=1e-5)
        expected = 4 * mlp.expert_outputs(x.reshape(-1, 64))[:, 2]
        assert torch.allclose(mlp(x).reshape(-1, 64), expected, atol=1e-5)
    set_top_k(moe, 3)
    assert mlp.top_k == 3


def test_routing_trace(tiny_model):
    part = make_partition(tiny_model, 4, "contiguous")
    moe = build_moe(tiny_model, part, top_k=2)
    ids = torch.randint(0, 128, (1, 11))
    with torch.no_grad(), record_routing(moe) as trace:
        moe(ids)
    index, probs = trace.stacked()
    assert set(index) == {0, 1}
    assert index[0].shape == (11, 2) and probs[0].shape == (11, 4)
    assert torch.allclose(probs[0].sum(-1), torch.ones(11))
    assert torch.equal(index[0], probs[0].topk(2, dim=-1).indices)
    with torch.no_grad():
        moe(ids)  # hooks are gone: nothing more is recorded
    assert len(trace.top_k_index[0]) == 1


def test_generate_works(tiny_model):
    part = make_partition(tiny_model, 4, "contiguous")
    moe = build_moe(tiny_model, part, top_k=1)
    out = moe.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)

