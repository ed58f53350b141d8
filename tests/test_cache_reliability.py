"""The cache answers only for what it computed: in-place changes and threads (issue 13).

A cached pair is reused only while the input and output tensors, the block's parameters,
buffers and bound contexts are all unchanged, however they were changed (in place, through
``p.data``, by ``load_state_dict``); and every thread has its own pair, so concurrent
``log_prob`` calls on one flow get the single-threaded answers. Numbers compare in float64
against a recomputation from a clone (a clone is never a cache hit).
"""

import copy
import pickle
import threading

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.torch_transform import ComposeTransformModule

from pyro_invres import residual_flow
from pyro_invres.transforms import (
    affine_coupling,
    channel_permutation,
    conditional_affine_coupling,
    conditional_iresnet,
    conditional_revnet_block,
    iresnet,
    reversible_stack,
    revnet_block,
)

F64 = torch.float64
DIM = 3


def normal(dim: int = DIM) -> dist.Distribution:
    return dist.Normal(torch.zeros(dim, dtype=F64), 1.0).to_event(1)


def randomise(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Coupling networks start at zero (the identity): give them something to compute."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def make(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "iresnet-forward":
        block = iresnet(DIM, [16], explicit="forward")
    elif kind == "iresnet-inverse":
        block = iresnet(DIM, [16], explicit="inverse")
    elif kind == "affine":
        block = affine_coupling(DIM, [16])
    elif kind == "revnet":
        block = revnet_block(DIM, [16], affine=True)
    elif kind == "stack":
        block = reversible_stack(
            [affine_coupling(DIM, [8]), channel_permutation(DIM, seed=1), iresnet(DIM, [8])]
        )
    else:
        raise AssertionError(kind)
    return randomise(block.double())


KINDS = ["iresnet-forward", "iresnet-inverse", "affine", "revnet", "stack"]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # the iterative side solves to its tolerance, not bit for bit
    return torch.allclose(a, b, atol=1e-7, rtol=0)


def count_calls(block: torch.nn.Module) -> list[int]:
    """Count the block's computations of the forward map (cache misses)."""
    calls: list[int] = []
    original = block._call_and_ladj  # every cache miss of the forward map runs this hook

    def counting(x: torch.Tensor) -> tuple:
        calls.append(1)
        return original(x)

    block._call_and_ladj = counting
    return calls


# -- in-place changes ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_an_input_changed_in_place_is_computed_anew(kind):
    block = make(kind)
    d = dist.TransformedDistribution(normal(), [block])
    data = torch.randn(6, DIM, dtype=F64)
    stale = d.log_prob(data).detach()  # scoring ran the inverse on ``data``
    data.mul_(2)  # the user reuses the buffer for new data
    got = d.log_prob(data)
    assert close(got, d.log_prob(data.clone()))
    assert not close(got, stale)
    x = torch.randn(6, DIM, dtype=F64)
    y = block(x)  # the forward map on ``x``
    x.mul_(2)
    got = block(x)
    assert close(got, block(x.clone()))
    assert not close(got, y)


@pytest.mark.parametrize("kind", KINDS)
def test_a_sample_changed_in_place_is_scored_anew(kind):
    block = make(kind)
    d = dist.TransformedDistribution(normal(), [block])
    y = d.sample((6,))
    stale = d.log_prob(y)
    y.mul_(1.5)
    got = d.log_prob(y)
    assert close(got, d.log_prob(y.clone()))
    assert not close(got, stale)


@pytest.mark.parametrize("kind", ["iresnet", "affine", "revnet"])
def test_a_context_changed_in_place_is_seen(kind):
    torch.manual_seed(0)
    if kind == "iresnet":
        cond = conditional_iresnet(DIM, context_dim=2, hidden_dims=[16])
    elif kind == "affine":
        cond = conditional_affine_coupling(DIM, 2, [16])
    else:
        cond = conditional_revnet_block(DIM, 2, [16], affine=True)
    cond = randomise(cond.double())
    flow = dist.ConditionalTransformedDistribution(normal(), [cond])
    context = torch.randn(2, dtype=F64)
    d = flow.condition(context)
    y = d.sample((6,))
    stale = d.log_prob(y)
    context.add_(1.0)  # the same conditioned distribution, a new context
    got = d.log_prob(y)
    expected = flow.condition(context.clone()).log_prob(y.clone())
    assert close(got, expected)
    assert not close(got, stale)


@pytest.mark.parametrize("shape", [5, (4, 2, 2)])
def test_a_channel_permutation_after_load_state_dict_is_the_new_one(shape):
    mine, other = channel_permutation(shape, seed=0), channel_permutation(shape, seed=3)
    assert not torch.equal(mine.permutation, other.permutation)
    x = torch.randn(3, *((shape,) if isinstance(shape, int) else shape))
    y = mine(x)
    mine.load_state_dict(other.state_dict())  # buffers, written in place
    assert torch.equal(mine(x), other(x))
    assert torch.equal(mine.inv(y), other.inv(y.clone()))


def _make_dyadic(p: torch.Tensor) -> None:
    """Round a parameter to multiples of 1/8: its sums of values and squares are exact."""
    p.data.copy_(torch.round(p.data * 8) / 8)


def _permute_values(p: torch.Tensor) -> None:
    """Shuffle a (dyadic) parameter's entries through ``p.data``, as an optimizer writing
    through ``p.data`` could: the version, and the norm and sum bit for bit, stay."""
    g = torch.Generator().manual_seed(1)
    flat = p.data.reshape(-1)
    shuffled = flat[torch.randperm(flat.numel(), generator=g)]
    assert not torch.equal(shuffled, flat)
    assert torch.equal(shuffled.sum(), flat.sum())
    assert torch.equal(torch.linalg.vector_norm(shuffled), torch.linalg.vector_norm(flat))
    version = p._version
    p.data.copy_(shuffled.reshape(p.shape))
    assert p._version == version


def _largest_parameter(block: torch.nn.Module) -> torch.Tensor:
    return max(block.parameters(), key=lambda p: p.numel())


@pytest.mark.parametrize("kind", KINDS)
def test_weights_permuted_through_p_data_are_seen(kind):
    block = make(kind)
    p = _largest_parameter(block)
    _make_dyadic(p)
    d = dist.TransformedDistribution(normal(), [block])
    x = torch.randn(6, DIM, dtype=F64)
    y = block(x)
    stale = d.log_prob(y)
    _permute_values(p)
    assert close(block(x), block(x.clone()))
    assert close(d.log_prob(y), d.log_prob(y.clone()))
    assert not close(d.log_prob(y), stale)


def test_a_one_ulp_write_through_p_data_is_seen_and_nothing_else_recomputes():
    block = make("affine")
    x = torch.randn(6, DIM, dtype=F64)
    block(x)
    calls = count_calls(block)
    block(x)
    assert calls == []  # unchanged: served from the cache
    p = _largest_parameter(block)
    entry = p.data.view(-1)[3]
    entry.copy_(torch.nextafter(entry, torch.tensor(float("inf"), dtype=F64)))
    block(x)
    assert calls == [1]


def test_parameters_replaced_by_load_state_dict_assign_are_seen():
    torch.manual_seed(0)
    mine, other = randomise(affine_coupling(DIM, [16]).double()), make("affine")
    x = torch.randn(6, DIM, dtype=F64)
    mine(x)
    mine.load_state_dict(other.state_dict(), assign=True)  # new Parameter objects
    assert torch.equal(mine(x), other(x.clone()))
    # the same values in new objects: the output must hang on the new ones' graph
    mine(x)
    same = {name: value.clone() for name, value in mine.state_dict().items()}
    mine.load_state_dict(same, assign=True)
    mine(x).sum().backward()
    assert all(p.grad is not None for p in mine.parameters())


@pytest.mark.parametrize("change", ["input", "weights"])
def test_the_logdet_memo_follows_every_change(change):
    block = make("iresnet-forward")
    p = _largest_parameter(block)
    _make_dyadic(p)
    x = torch.randn(6, DIM, dtype=F64)
    y = block(x)
    stale = block.log_abs_det_jacobian(x, y)
    if change == "input":
        x.mul_(2)
    else:
        _permute_values(p)
    got = block.log_abs_det_jacobian(x, y)
    expected = block.log_abs_det_jacobian(x.clone(), y.clone())
    assert close(got, expected)
    assert not close(got, stale)


def test_inference_tensors_changed_in_place_are_scored_anew():
    # inference tensors keep no version counter: their pairs are never reused
    block = make("iresnet-forward")
    d = dist.TransformedDistribution(normal(), [block])
    with torch.inference_mode():
        y = d.sample((6,))
        stale = d.log_prob(y)
        y.mul_(1.5)
        got = d.log_prob(y)
        assert close(got, d.log_prob(y.clone()))
        assert not close(got, stale)


# -- threads -----------------------------------------------------------------------------------
def _flow(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "residual_flow":
        flow = residual_flow(DIM, num_blocks=2, hidden_dims=[16], explicit="inverse").double()
    else:
        flow = ComposeTransformModule(
            [affine_coupling(DIM, [16]), channel_permutation(DIM, seed=0)] * 2
        ).double()
    flow(torch.randn(32, DIM, dtype=F64))  # data-initialise ActNorm, refresh the norms
    return randomise(flow, 0.1)


@pytest.mark.parametrize("kind", ["residual_flow", "coupling"])
def test_threads_hammering_log_prob_get_the_single_threaded_answers(kind):
    flow = _flow(kind)
    d = dist.TransformedDistribution(normal(), [flow])
    inputs = [torch.randn(5, DIM, dtype=F64) for _ in range(6)]
    with torch.no_grad():
        expected = [d.log_prob(x.clone()) for x in inputs]
    n_threads, rounds = 4, 120
    wrong: list[tuple] = []
    errors: list[BaseException] = []
    own: list[tuple[torch.Tensor, torch.Tensor]] = []
    start = threading.Barrier(n_threads)

    def work(i: int) -> None:
        try:
            start.wait()
            for k in range(rounds):
                with torch.no_grad():
                    if k % 4 == 3:  # a sample of this thread, scored from its own cache
                        y = d.sample((5,))
                        own.append((y, d.log_prob(y)))
                        continue
                    j = (i + k) % len(inputs)  # the same tensors as the other threads
                    value = d.log_prob(inputs[j])
                if not torch.allclose(value, expected[j], atol=1e-10, rtol=0):
                    wrong.append((i, k, j))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert wrong == []
    assert len(own) == n_threads * rounds // 4
    with torch.no_grad():
        for y, value in own:
            assert torch.allclose(value, d.log_prob(y.clone()), atol=1e-10, rtol=0)


def test_a_sample_scored_in_another_thread_is_computed_there():
    flow = _flow("coupling")
    d = dist.TransformedDistribution(normal(), [flow])
    y = d.sample((5,))
    here = d.log_prob(y)
    there: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: there.append(d.log_prob(y)))
    thread.start()
    thread.join()
    assert torch.allclose(there[0], here, atol=1e-12, rtol=0)


def test_copies_and_pickles_after_threaded_use_have_their_own_cache():
    flow = _flow("coupling")
    d = dist.TransformedDistribution(normal(), [flow])
    x = torch.randn(5, DIM, dtype=F64)
    thread = threading.Thread(target=lambda: d.log_prob(x))
    thread.start()
    thread.join()
    d.log_prob(x)
    for clone in (copy.deepcopy(flow), pickle.loads(pickle.dumps(flow))):
        assert torch.equal(clone(x), flow(x.clone()))
        with torch.no_grad():
            for p in clone.parameters():
                p.mul_(2)  # the copy's parameters are its own
        assert not torch.equal(clone(x), flow(x))
    residual = _flow("residual_flow")  # deepcopy (pickling parametrized modules: item 9)
    residual(x)
    assert torch.equal(copy.deepcopy(residual)(x), residual(x.clone()))


def test_saving_a_state_dict_keeps_the_pair():
    """``state_dict()`` writes the spectral norms' bookkeeping buffers, not the map: a
    sample is still scored from the cache (no fixed-point solve), bit for bit."""
    block = make("iresnet-forward")
    d = dist.TransformedDistribution(normal(), [block])
    y = d.sample((6,))
    before = d.log_prob(y)
    block.state_dict()
    block.solve_stats.reset()
    assert torch.equal(d.log_prob(y), before)
    assert block.solve_stats.solves == 0


def test_a_permutation_buffer_written_through_data_is_seen():
    """Integer buffers are part of the value digest: indices swapped through ``.data``
    (no version bump) give the new map, not the cached one."""
    from pyro_invres import ChannelPermutation

    p = ChannelPermutation(4, event_dim=1)
    x = torch.randn(3, 4, dtype=torch.float64)
    p = p.double()
    first = p(x)
    perm = p.permutation.data
    perm[[0, 1]] = perm[[1, 0]]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(4)
    p.inverse_permutation.data.copy_(inv)
    assert torch.equal(p(x), x[..., perm])
    assert not torch.equal(p(x), first)
