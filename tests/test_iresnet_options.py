"""i-ResNet options as objects, one conditional path, one activation vocabulary (issue 14)."""

import inspect

import pytest
import torch

from pyro_invres import (
    ConditionalInvertibleResidual,
    InvertibleResidual,
    conditional_iresnet,
    iresnet,
    residual_flow,
)
from pyro_invres.nn import ConditionalLipschitzMLP, LipELU, make_conditioner
from pyro_invres.ops import Anderson, Auto, Exact, FixedPoint, Newton, Roulette, Series


def _options(fn) -> list[str]:
    return [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"
    ]


@pytest.mark.parametrize(
    "fn",
    [
        InvertibleResidual.__init__,
        ConditionalInvertibleResidual.__init__,
        iresnet,
        conditional_iresnet,
        residual_flow,
    ],
)
def test_at_most_ten_options(fn):
    assert len(_options(fn)) <= 10, _options(fn)


def test_strings_are_shorthands_for_the_objects():
    assert iresnet(32, logdet="roulette").logdet == Roulette()
    assert iresnet(32, logdet="series").logdet == Series()
    assert iresnet(2).logdet == Auto() and iresnet(2).estimator == Exact()
    assert iresnet(32).estimator == Roulette()
    assert iresnet(2, solver="anderson").solver == Anderson()
    assert iresnet(2, solver="newton").solver == Newton()
    assert iresnet(2).solver == FixedPoint()


def test_old_flat_keywords_map_onto_the_objects_with_the_same_numbers():
    block = iresnet(8, [16], logdet="roulette", n_probes=3, probe="rademacher", n_exact_terms=4)
    assert block.logdet == Roulette(n_exact_terms=4, n_probes=3, probe="rademacher")
    solver = iresnet(2, solver="anderson", atol=1e-7, max_iter=50, strict=True).solver
    assert solver == Anderson(atol=1e-7, max_iter=50, strict=True)
    assert iresnet(40, exact_max_dim=64).estimator == Exact()
    # the same seed gives the same estimate either way (float64)
    torch.manual_seed(0)
    old = iresnet(8, [16], logdet="series", n_series_terms=3, n_probes=2).double()
    new = iresnet(8, [16], logdet=Series(n_terms=3, n_probes=2)).double()
    new.load_state_dict(old.state_dict())
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.manual_seed(1)
    a = old.log_abs_det_jacobian(x, old(x))
    torch.manual_seed(1)
    b = new.log_abs_det_jacobian(x, new(x))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: iresnet(2, n_probes=4), "resolves to the exact log-det"),
        (lambda: iresnet(2, logdet=Auto(otherwise=Roulette(n_probes=4))), "cannot apply"),
        (lambda: iresnet(32, logdet="exact", n_probes=4), r"\['n_probes'\] do not apply"),
        (lambda: iresnet(32, logdet="exact", gradient="backprop"), "do not apply"),
        (lambda: iresnet(32, logdet="series", n_exact_terms=4), "do not apply"),
        (lambda: iresnet(32, logdet="roulette", n_series_terms=4), "do not apply"),
        (lambda: iresnet(32, logdet=Roulette(), n_probes=4), "set them on the object"),
        (lambda: iresnet(2, solver=Anderson(), atol=1e-6), "set them on the object"),
        (lambda: iresnet(2, unknown_option=1), "unexpected option"),
        (lambda: iresnet((1, 4, 4), [4], solver="newton"), "vector event"),
        (lambda: residual_flow(2, num_scales=3), "num_scales applies to image flows"),
        (lambda: residual_flow(2, factor_out=False), "factor_out applies to image flows"),
        (lambda: Roulette(distribution="poisson", param=-1.0), "poisson lambda"),
        (lambda: FixedPoint(max_iter=0), "max_iter"),
    ],
)
def test_an_option_that_cannot_apply_is_an_error(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_newton_with_forward_hooks_is_an_error():
    block = iresnet(2, [8])
    handle = block.nn.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="bypasses the forward hooks"):
        block.solver = "newton"
    handle.remove()
    block = iresnet(2, [8], solver="newton")
    block.nn.register_forward_hook(lambda *args: None)  # added after construction
    with pytest.raises(RuntimeError, match="bypasses the forward hooks"):
        block.inv(torch.randn(3, 2))


def test_setting_the_estimator_rechecks_it_and_changes_the_log_det():
    torch.manual_seed(0)
    block = iresnet(32, [16]).double()
    x = torch.randn(4, 32, dtype=torch.float64)
    block.logdet = "exact"
    exact = block.log_abs_det_jacobian(x, block(x))
    jac = torch.autograd.functional.jacobian(lambda v: block(v).sum(0), x).transpose(0, 1)
    assert torch.allclose(exact, torch.linalg.slogdet(jac)[1], atol=1e-10)
    with pytest.raises(ValueError, match="unknown logdet"):
        block.logdet = "magic"


def test_conditional_iresnet_around_a_float64_network_builds_and_is_exact():
    torch.manual_seed(0)
    net = ConditionalLipschitzMLP(2, 3, [16], lipschitz=0.9).double()
    block = ConditionalInvertibleResidual(net, 2, logdet="exact")
    context = torch.randn(3, dtype=torch.float64)
    conditioned = block.condition(context)
    x = torch.randn(5, 2, dtype=torch.float64)
    y, ladj = conditioned.call_and_ladj(x, cached=False)
    back = conditioned.inverse(y, cached=False)
    assert torch.allclose(back, x, atol=1e-9)
    jac = torch.autograd.functional.jacobian(lambda v: conditioned(v).sum(0), x).transpose(0, 1)
    assert torch.allclose(ladj, torch.linalg.slogdet(jac)[1], atol=1e-9)
    # also the factory, built in float32 and moved
    moved = conditional_iresnet(2, 3, [8]).double()
    assert moved.condition(context)(x).dtype == torch.float64


def test_condition_shares_solve_statistics():
    block = conditional_iresnet(2, 1, [8])
    for c in (0.0, 1.0):
        block.condition(torch.tensor([c])).inv(torch.randn(4, 2))
    assert block.solve_stats.solves == 2
    assert block.solve_stats.last.converged


def test_one_activation_vocabulary():
    # "elu" is ELU with alpha = 1 in a coupling conditioner as in an i-ResNet branch
    net = make_conditioner(2, 2, [8], activation="elu")
    assert any(isinstance(m, LipELU) for m in net.modules())
    assert iresnet(2, [8], activation="relu")(torch.randn(3, 2)).shape == (3, 2)
    with pytest.raises(ValueError, match="changes the width"):
        make_conditioner(2, 2, [8], activation="clipswish")


def test_cli_configuration_still_builds():
    from pyro_invres.cli import flow_options
    from pyro_invres.flows import build_flow

    flow = build_flow("iresnet", 2, **flow_options())
    blocks = [m for m in flow.modules() if isinstance(m, InvertibleResidual)]
    assert blocks and all(isinstance(b.solver, Newton) for b in blocks)
    # an older configuration with the flat solver keys
    flow = build_flow("iresnet", 2, num_blocks=1, hidden_dims=[8], atol=1e-6, max_iter=99)
    block = next(m for m in flow.modules() if isinstance(m, InvertibleResidual))
    assert block.solver == FixedPoint(atol=1e-6, max_iter=99)


@pytest.mark.parametrize("explicit", ["forward", "inverse"])
def test_block_contract_log_det_is_lazy_and_matches_the_pair(explicit):
    torch.manual_seed(0)
    block = iresnet(3, [8], explicit=explicit).double()
    calls = []
    original = block.residual_logdet
    block.residual_logdet = lambda z, memo=None: calls.append(1) or original(z, memo)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = block(x)  # sampling without scoring: no log-det
    assert calls == []
    first = block.log_abs_det_jacobian(x, y)
    assert block.log_abs_det_jacobian(x, y) is first and len(calls) == 1
    _, ladj = block.call_and_ladj(x, cached=False)
    x_back, ladj_inv = block.inverse_and_ladj(y, cached=False)
    assert torch.allclose(ladj, first, atol=1e-10)
    assert torch.allclose(ladj_inv, first, atol=1e-8)
    assert torch.allclose(x_back, x, atol=1e-8)


def test_input_dim_is_the_one_shape_vocabulary():
    from pyro_invres.nn import LipschitzMLP

    block = InvertibleResidual(LipschitzMLP(3, [8], lipschitz=0.9), input_dim=3)
    assert tuple(block.event_shape) == (3,)
    assert tuple(conditional_iresnet((2,), 1, [4]).event_shape) == (2,)
    with pytest.raises(ValueError, match=r"vector blocks: input_dim must be D or \(D,\)"):
        conditional_iresnet((1, 4, 4), 1)


def test_a_block_pickled_with_the_old_flat_attributes_loads_with_the_same_options():
    import pickle

    torch.manual_seed(0)
    block = iresnet(3, [8], logdet="series", n_series_terms=3, solver="anderson", atol=1e-6)
    # the attributes an earlier version kept (every estimator option, applicable or not)
    state = {k: v for k, v in block.__dict__.items() if k not in ("_logdet", "_estimator")}
    del state["_solver"]
    state.update(
        logdet="series", exact_max_dim=16, n_exact_terms=2, roulette="geometric",
        roulette_param=0.5, n_series_terms=3, n_probes=1, probe="gaussian",
        gradient="neumann", warm_start=True, solver="anderson",
        solver_options={"atol": 1e-6, "rtol": None, "max_iter": 1000,
                        "method": "anderson", "strict": False},
    )  # fmt: skip
    old = object.__new__(InvertibleResidual)
    old.__dict__.update(state)
    loaded = pickle.loads(pickle.dumps(old))
    assert loaded.logdet == Series(n_terms=3)
    assert loaded.solver == Anderson(atol=1e-6)
    x = torch.randn(4, 3)
    assert torch.equal(loaded(x), block(x))


def test_relu_branch_carries_the_right_jacobian():
    torch.manual_seed(0)
    block = iresnet(3, [8], activation="relu", logdet="exact").double()
    x = torch.randn(6, 3, dtype=torch.float64)
    ladj = block.log_abs_det_jacobian(x, block(x))
    jac = torch.autograd.functional.jacobian(lambda v: block.nn(v).sum(0), x).transpose(0, 1)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(ladj, torch.linalg.slogdet(eye + jac)[1], atol=1e-10)
