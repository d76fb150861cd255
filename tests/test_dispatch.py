"""The fast dispatch paths of FactorizedMLP equal the compute-all-and-mask reference."""
import pytest
import torch
from torch import nn

from factorlab.factorize import build_moe, make_partition
from factorlab.moe import FactorizedMLP, factorized_layers, set_top_k

HIDDEN, N = 64, 4
GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}


class _Mlp(nn.Module):
    def __init__(self, hidden: int = HIDDEN, inter: int = 128):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()


def make_mlp(shared_size: int = 0, top_k: int = 1, mode: str = "scaled", seed: int = 0) -> FactorizedMLP:
    torch.manual_seed(seed)
    mlp = FactorizedMLP(_Mlp(), torch.randperm(128), N, top_k, mode, shared_size)
    nn.init.normal_(mlp.router.linear.weight, std=0.5)  # spread routing over experts
    return mlp.requires_grad_(False)


def reference_dispatch(mlp: FactorizedMLP, x: torch.Tensor, top_k_index: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    per_expert = torch.zeros(x.shape[0], N).scatter_(1, top_k_index, weights)  # (T, N)
    return torch.einsum("tn,tnh->th", per_expert, mlp.expert_outputs(x))


@pytest.mark.parametrize("shared_size", [0, 32])
@pytest.mark.parametrize("mode", ["scaled", "gated"])
@pytest.mark.parametrize("grad_mode", list(GRAD_MODES))
def test_forward_equals_reference(shared_size, mode, grad_mode):
    mlp = make_mlp(shared_size, mode=mode)
    gen = torch.Generator().manual_seed(1)
    for top_k in range(1, N + 1):
        mlp.set_top_k(top_k)
        for shape in [(1, HIDDEN), (2, HIDDEN), (7, HIDDEN), (64, HIDDEN), (3, 1, HIDDEN), (2, 7, HIDDEN)]:
            x = torch.randn(*shape, generator=gen)
            with torch.no_grad():
                expected = mlp.forward_reference(x)
            with GRAD_MODES[grad_mode]():
                out = mlp(x.requires_grad_(grad_mode == "grad"))  # grad: the autograd path
            assert out.shape == x.shape and out.requires_grad == (grad_mode == "grad")
            torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5,
                                       msg=f"K={top_k} shape={shape}")


@pytest.mark.parametrize("tokens", [1, 2, 7, 64])
@pytest.mark.parametrize("grad_mode", list(GRAD_MODES))
def test_dispatch_with_empty_experts(tokens, grad_mode):
    """Every token sent to the same experts: the others get no rows and must be skipped cleanly."""
    mlp = make_mlp()
    x = torch.randn(tokens, HIDDEN)
    for chosen in ([2], [0, 3], [3, 1, 0]):
        top_k_index = torch.tensor(chosen).repeat(tokens, 1)  # (T, K)
        weights = torch.rand(tokens, len(chosen)).requires_grad_(grad_mode == "grad")
        with GRAD_MODES[grad_mode]():
            out = mlp.dispatch(x, top_k_index, weights)
        torch.testing.assert_close(out.detach(), reference_dispatch(mlp, x, top_k_index, weights), rtol=1e-5, atol=1e-5)


def test_all_tokens_routed_to_one_expert_through_the_router():
    mlp = make_mlp(shared_size=32, mode="gated")
    with torch.no_grad():
        mlp.router.linear.weight.zero_()
        mlp.router.linear.weight[1] = 1.0  # expert 1 scores sum(x): positive inputs always pick it
    x = torch.rand(16, HIDDEN) + 0.1
    assert (mlp.router(x)[3][:, 0] == 1).all()
    for top_k in (1, 2):
        mlp.set_top_k(top_k)
        with torch.no_grad():
            torch.testing.assert_close(mlp(x), mlp.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_accelerator_decode_path_equals_reference():
    """Few tokens off the CPU gather the experts' weights; check that path here on CPU."""
    mlp = make_mlp(mode="gated")
    for top_k in range(1, N + 1):
        mlp.set_top_k(top_k)
        for tokens in (1, 3):
            x = torch.randn(tokens, HIDDEN)
            _, _, top_k_probs, top_k_index = mlp.router(x)
            weights = mlp._combine(top_k_probs, N)
            out = mlp._dispatch_gather_weights(x, top_k_index, weights)
            torch.testing.assert_close(out, reference_dispatch(mlp, x, top_k_index, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared_size", [0, 32])
def test_training_gradients_equal_reference(shared_size):
    mlp = make_mlp(shared_size, top_k=2, mode="gated")
    x = torch.randn(20, HIDDEN)
    params = [mlp.gate_up, mlp.down, mlp.router.linear.weight] + (
        [mlp.shared_gate_up, mlp.shared_down] if shared_size else [])
    grads = []
    for fn in (mlp, mlp.forward_reference):
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        (fn(x) ** 2).sum().backward()
        grads.append([p.grad.clone() for p in params])
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_outputs_follow_in_place_weight_updates():
    """Training edits parameters in place: no cached copy may serve stale weights."""
    mlp = make_mlp(top_k=2)
    x = torch.randn(9, HIDDEN)
    with torch.no_grad():
        before = mlp(x)
        for p in (mlp.gate_up, mlp.down):
            p.mul_(1.5)
        after = mlp(x)
        torch.testing.assert_close(after, mlp.forward_reference(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_cached_decode_matches_full_forward(tiny_model):
    """Token-by-token decode (one-token path) gives the logits of one full forward (sorted path)."""
    moe = build_moe(tiny_model, make_partition(tiny_model, N, "random", seed=3), top_k=2, output_mode="gated")
    for mlp in factorized_layers(moe).values():
        nn.init.normal_(mlp.router.linear.weight, std=0.5)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    for top_k in (1, 2):
        set_top_k(moe, top_k)
        with torch.inference_mode():
            full = moe(ids).logits[0]  # (T, V)
            out = moe(ids[:, :4], use_cache=True)
            cache, steps = out.past_key_values, [out.logits[0, -1]]
            for t in range(4, 12):
                out = moe(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits[0, -1])
        torch.testing.assert_close(torch.stack(steps), full[3:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shared_size", [0, 32])
@pytest.mark.parametrize("mode", ["scaled", "gated"])
@pytest.mark.parametrize("min_experts", [0, 1])
def test_single_token_decode_equals_reference_per_token_k(shared_size, mode, min_experts):
    """The decode path routes one token in Python: the same experts, weights and output as the tensor path,
    at every K, for tokens that run none, some or all experts, and it counts the experts that ran."""
    from factorlab.moe import count_active_experts

    mlp = make_mlp(shared_size, mode=mode)
    mlp.set_thresholds(torch.tensor([0.9, 0.6, 0.35, 0.1]), min_experts=min_experts)
    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(40, HIDDEN, generator=gen)
    holder = nn.Module()  # count_active_experts walks model.model.layers[i].mlp
    holder.model = nn.Module()
    holder.model.layers = nn.ModuleList([nn.Module()])
    holder.model.layers[0].mlp = mlp
    for top_k in range(1, N + 1):
        mlp.set_top_k(top_k)
        with torch.inference_mode():
            expected_pairs = int((mlp.routing_weights(xs) > 0).sum())
            with count_active_experts(holder) as mean_k:
                outs = [mlp(x.view(1, 1, HIDDEN)).view(1, HIDDEN) for x in xs]
            torch.testing.assert_close(torch.cat(outs), mlp.forward_reference(xs), rtol=1e-5, atol=1e-5,
                                       msg=f"K={top_k}")
        if not mlp.dense_at_n:  # gated K = N is the dense FFN: no routed expert counted
            assert mean_k[0] == pytest.approx(expected_pairs / len(xs))


def test_decode_routing_trace_equals_the_batch_trace(tiny_model):
    """record_routing sees one-token forwards (the chat's coloured replies) as it sees a whole prompt."""
    from factorlab.moe import record_routing

    moe = build_moe(tiny_model, make_partition(tiny_model, N, "random", seed=3), top_k=2, output_mode="scaled")
    for mlp in factorized_layers(moe).values():
        nn.init.normal_(mlp.router.linear.weight, std=0.5)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with record_routing(moe) as whole:
            moe(ids)
        with record_routing(moe) as steps:
            out = moe(ids[:, :1], use_cache=True)
            for t in range(1, 10):
                out = moe(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
    (whole_index, whole_probs), (step_index, step_probs) = whole.stacked(), steps.stacked()
    for i in whole_index:
        assert torch.equal(whole_index[i], step_index[i])
        torch.testing.assert_close(whole_probs[i], step_probs[i], rtol=1e-4, atol=1e-5)
    assert all(m.on_route is None for m in factorized_layers(moe).values())  # nothing left behind


@pytest.mark.parametrize("shared_size", [0, 32])
def test_gate_up_weights_stay_views_of_the_packed_matrix(shared_size):
    """Decode reads gate/up through the packed (H, 2I) matrix: conversions, in-place updates and copies
    into the parameters must all be seen there, and stored tensors come out contiguous."""
    import copy

    from factorlab.runs import moe_tensors

    mlp = make_mlp(shared_size, top_k=2, mode="gated")
    x = torch.randn(1, HIDDEN)

    def shares_storage(m):
        ptr = m._gate_up_t.untyped_storage().data_ptr()
        return all(p.untyped_storage().data_ptr() == ptr for p in (m.gate_up, m.shared_gate_up) if p.numel())

    with torch.no_grad():
        mlp.gate_up.mul_(1.5)  # in place, as training's optimiser does
        mlp.gate_up[1].copy_(torch.randn(2 * mlp.expert_size, HIDDEN))  # as loading a run does
        torch.testing.assert_close(mlp(x), mlp.forward_reference(x), rtol=1e-5, atol=1e-5)
        for dtype in (torch.float64, torch.bfloat16, torch.float32):
            mlp.to(dtype)
            assert shares_storage(mlp) and mlp._gate_up_t.dtype == dtype
            xd = x.to(dtype)
            tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mlp(xd), mlp.forward_reference(xd), **tol)
        twin = copy.deepcopy(mlp)  # parameters cloned one by one: decode packs them again
        torch.testing.assert_close(twin(x), mlp(x))
        assert shares_storage(twin) and twin._gate_up_t.data_ptr() != mlp._gate_up_t.data_ptr()
        twin.gate_up.mul_(2.0)
        torch.testing.assert_close(twin(x), twin.forward_reference(x), rtol=1e-5, atol=1e-5)
    holder = nn.Module()
    holder.model = nn.Module()
    holder.model.layers = nn.ModuleList([nn.Module()])
    holder.model.layers[0].mlp = mlp
    part = type("P", (), {"to_tensors": lambda self: {}})()
    stored = moe_tensors(holder, part, tuned=True)
    assert stored["gate_up.0"].is_contiguous() and torch.equal(stored["gate_up.0"], mlp.gate_up)


@pytest.mark.parametrize("shared_size", [0, 32])
@pytest.mark.parametrize("mode", ["scaled", "gated"])
@pytest.mark.parametrize("per_token", [False, True])
def test_grouped_gemm_path_equals_reference(shared_size, mode, per_token):
    """The accelerators' prefill path (torch._grouped_mm, no per-expert loop) computes the same function;
    checked here on the CPU, where the kernel also runs (no GPU in CI)."""
    mlp = make_mlp(shared_size, mode=mode)
    if per_token:
        mlp.set_thresholds(torch.tensor([0.9, 0.6, 0.35, 0.1]), min_experts=0)
    x = torch.randn(37, HIDDEN, generator=torch.Generator().manual_seed(4))
    for top_k in range(1, N):
        mlp.set_top_k(top_k)
        with torch.inference_mode():
            top_k_index, weights = mlp.selection(mlp.router.logits(x))
            out = mlp._dispatch_grouped(x, top_k_index, weights, into=mlp.shared_output(x).expand_as(x).clone())
            torch.testing.assert_close(out, mlp.forward_reference(x), rtol=1e-5, atol=1e-5, msg=f"K={top_k}")


@pytest.mark.parametrize("shared_size", [0, 32])
def test_decode_buffers_follow_weight_swaps_grad_modes_and_threads(shared_size):
    """Decode keeps per-thread buffers and weight views between tokens: they must follow a K's own weights
    (a pointer swap), in-place updates and dtype changes, work in and out of inference mode, and two threads
    decoding the same layer at once must not share a buffer."""
    import threading

    mlp = make_mlp(shared_size, mode="scaled")
    mlp.set_thresholds(torch.tensor([0.9, 0.6, 0.35, 0.1]))
    gen = torch.Generator().manual_seed(3)
    mlp.weights_by_k = {k: (torch.randn(mlp.down.shape, generator=gen), torch.randn(mlp.shared_down.shape, generator=gen))
                        for k in (1, 2)}
    xs = torch.randn(24, HIDDEN, generator=gen)

    def check(k, grad_mode, tol=1e-5):
        mlp.set_top_k(k)
        with GRAD_MODES[grad_mode]():
            out = torch.cat([mlp(x.view(1, 1, -1)).view(1, -1) for x in xs])
        with torch.no_grad():
            torch.testing.assert_close(out, mlp.forward_reference(xs), rtol=tol, atol=tol, msg=f"K={k} {grad_mode}")

    for k, grad_mode in [(2, "inference_mode"), (1, "no_grad"), (2, "no_grad"), (3, "inference_mode"), (1, "grad")]:
        check(k, grad_mode)
    with torch.no_grad():
        mlp.down.mul_(2.0)  # in place: K=1's own weights, seen through the views
    check(1, "inference_mode")
    mlp.double()
    xs = xs.double()
    check(2, "no_grad")
    mlp.float()
    xs = xs.float()

    mlp.set_top_k(2)
    with torch.no_grad():
        expected = mlp.forward_reference(xs)
    results, errors = {}, []

    def decode(name):
        try:
            with torch.inference_mode():
                for _ in range(20):
                    results[name] = torch.cat([mlp(x.view(1, 1, -1)).view(1, -1) for x in xs])
                    torch.testing.assert_close(results[name], expected, rtol=1e-5, atol=1e-5)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    assert len(mlp._decode_cache) >= 3  # one buffer per thread
