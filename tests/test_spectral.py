"""The spectral-norm refresh: exact for small layers, Lanczos on the smaller side otherwise."""

import numpy as np
import pytest
import torch

from pyro_invres.nn import spectral, spectral_norm
from pyro_invres.nn.spectral import _EXACT_MAX_SIDE, SpectralNormScale


def _norm(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.detach().double(), ord=2))


def _param(layer: torch.nn.Module) -> SpectralNormScale:
    return layer.parametrizations.weight[0]


@pytest.mark.parametrize("shape", [(32, 2), (2, 32), (8, 40), (20, 7)])
def test_small_layers_get_the_exact_norm_at_every_step(shape):
    assert min(shape) <= _EXACT_MAX_SIDE
    torch.manual_seed(0)
    c = 0.9
    layer = spectral_norm(torch.nn.Linear(shape[1], shape[0]), c)
    original = layer.parametrizations.weight.original
    for _ in range(30):
        with torch.no_grad():  # an optimiser step that grows the weight
            original.mul_(1.05).add_(0.05 * torch.randn_like(original))
        weight = layer.weight
        sn = _param(layer)
        true = _norm(original)
        assert float(sn.sigma(original.detach())) == pytest.approx(true, rel=2e-6)
        assert _norm(weight) <= c * (1 + 2e-6)


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)])
def test_lanczos_runs_on_the_smaller_side_and_stops_when_it_is_full(shape):
    assert min(shape) > _EXACT_MAX_SIDE
    torch.manual_seed(1)
    weight = torch.randn(*shape, dtype=torch.float64)
    sn = SpectralNormScale(weight, 1.0, tol=0.0)  # only a full Krylov space can stop it
    products = []
    matvec = sn._matvec
    sn._matvec = lambda w, v: products.append(1) or matvec(w, v)
    assert sn.refresh(weight, max_iterations=500)
    # one product for the starting estimate, at most one per step in a 40-dimensional
    # space, one for the final vectors
    assert len(products) <= 40 + 2
    assert float(sn.sigma(weight)) == pytest.approx(_norm(weight), rel=1e-10)


def test_a_converged_lanczos_state_is_left_bit_for_bit():
    torch.manual_seed(2)
    weight = torch.randn(64, 48)
    sn = SpectralNormScale(weight, 1.0)
    sn.refresh(weight, max_iterations=500)
    u, v = sn.u.clone(), sn.v.clone()
    assert sn.refresh(weight)
    assert torch.equal(sn.u, u) and torch.equal(sn.v, v)


def test_exact_refresh_is_deterministic_and_keeps_the_bound_in_float64():
    torch.manual_seed(3)
    weight = torch.randn(32, 5, dtype=torch.float64)  # 5 <= _EXACT_MAX_SIDE
    sn = SpectralNormScale(weight, 0.5)
    assert sn.refresh(weight)
    u, v = sn.u.clone(), sn.v.clone()
    assert sn.refresh(weight)
    assert torch.equal(sn.u, u) and torch.equal(sn.v, v)
    assert float(sn.sigma(weight)) == pytest.approx(_norm(weight), rel=1e-12)
    assert _norm(sn(weight)) <= 0.5 * (1 + 1e-12)


def test_the_torch_and_numpy_lanczos_paths_agree(monkeypatch):
    # CPU dense layers iterate on numpy views; convolutions and GPU tensors use torch
    torch.manual_seed(4)
    weight = torch.randn(100, 80, dtype=torch.float64)
    results = []
    for host in (True, False):
        if not host:
            monkeypatch.setattr(spectral, "_HOST_DTYPES", ())
        sn = SpectralNormScale(weight, 1.0)
        assert sn.refresh(weight, max_iterations=300)
        results.append(float(sn.sigma(weight)))
    assert results[0] == pytest.approx(_norm(weight), rel=1e-10)
    assert results[1] == pytest.approx(results[0], rel=1e-10)


def test_thin_layer_closed_form_matches_eigh():
    """The 2 x 2 Gram matrices of 2-D flows' thin layers are solved in closed form,
    degenerate ones (a zero column, equal columns, a multiple of the identity) included."""
    import numpy as np

    from pyro_invres.nn.spectral import _top_gram_vector

    rng = np.random.default_rng(0)
    cases = [rng.normal(size=(int(rng.integers(1, 6)), 2)) for _ in range(300)]
    cases += [np.array([[1.0, 0.0], [2.0, 0.0]]), np.array([[1.0, 1.0], [2.0, 2.0]])]
    cases += [np.eye(2), np.zeros((3, 2))]
    for w in cases:
        gram = w.T @ w
        top = _top_gram_vector(gram)
        assert abs(np.linalg.norm(top) - 1.0) < 1e-12
        assert abs(top @ gram @ top - np.linalg.eigvalsh(gram)[-1]) <= 1e-12 * max(1.0, gram.max())


def _tridiagonal(k: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    tri = np.zeros((size, size))
    diag, off = rng.standard_normal(k), rng.standard_normal(k - 1)
    tri[np.arange(k), np.arange(k)] = diag
    tri[np.arange(k - 1), np.arange(1, k)] = off
    tri[np.arange(1, k), np.arange(k - 1)] = off
    return tri


def test_the_ritz_pair_is_numpys_eigh_bit_for_bit():
    # the Lanczos step calls LAPACK through numpy's ufunc directly (no wrapper overhead):
    # the same routine, so the same bits as np.linalg.eigvalsh / eigh on the top-left block
    rng = np.random.default_rng(0)
    for k in range(2, 33):
        for _ in range(20):
            tri = _tridiagonal(k, rng)
            block = tri[:k, :k]
            if k > 2:  # two steps have their closed form
                assert spectral._top_eigenvalue(tri, k) == float(np.linalg.eigvalsh(block)[-1])
            expected = np.ascontiguousarray(np.linalg.eigh(block)[1][:, -1])
            assert np.array_equal(spectral._top_eigenvector(tri, k), expected)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_non_finite_tridiagonal_gets_numpys_own_answer():
    # (the direct call warns of the NaN before handing over to numpy's public function)
    tri = _tridiagonal(5, np.random.default_rng(1))
    tri[2, 2] = np.nan
    try:
        expected: object = float(np.linalg.eigvalsh(tri[:5, :5])[-1])
    except np.linalg.LinAlgError:
        expected = np.linalg.LinAlgError
    if expected is np.linalg.LinAlgError:
        with pytest.raises(np.linalg.LinAlgError):
            spectral._top_eigenvalue(tri, 5)
    else:
        got = spectral._top_eigenvalue(tri, 5)
        assert got == expected or (np.isnan(got) and np.isnan(expected))


def _known_svd(m: int, n: int, top: tuple[float, ...], dtype: torch.dtype) -> tuple:
    g = torch.Generator().manual_seed(7)
    u = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    s = torch.linspace(1.0, 0.1, n, dtype=torch.float64)
    s[: len(top)] = torch.tensor(top, dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype), u.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("host", [True, False])
def test_a_stall_at_the_second_singular_value_is_caught_by_the_check(dtype, host, monkeypatch):
    # a warm start on the second singular vector (the top two crossed, or the weight
    # jumped): the Krylov space never leaves it and the stopping rule calls it converged
    if not host:
        monkeypatch.setattr(spectral, "_HOST_DTYPES", ())
    weight, u, v = _known_svd(64, 40, (2.0, 1.96), dtype)
    sn = SpectralNormScale(weight, 1.0)
    sn.u.copy_(u[:, 1])
    sn.v.copy_(v[:, 1])
    assert sn.refresh(weight, max_iterations=200, check=False)
    assert float(sn.sigma(weight)) == pytest.approx(1.96, rel=1e-4)  # the stall
    assert sn.refresh(weight, max_iterations=200, check=True)
    assert float(sn.sigma(weight)) == pytest.approx(2.0, rel=1e-5)
    # at the true top vector the complement's largest value is the second one
    other, _ = sn.complement_sigma(weight, 1e-5)
    assert other <= 1.96 * (1 + 1e-5)


def test_evaluation_checks_every_refresh_and_training_one_in_sixteen(monkeypatch):
    torch.manual_seed(5)
    layer = spectral_norm(torch.nn.Linear(24, 32), 0.9)
    sn = _param(layer)
    calls = []
    check = sn.complement_sigma
    monkeypatch.setattr(sn, "complement_sigma", lambda w, t: calls.append(1) or check(w, t))
    original = layer.parametrizations.weight.original
    for _ in range(2 * spectral._CHECK_EVERY):
        with torch.no_grad():
            original.add_(1e-3 * torch.randn_like(original))
        layer(torch.randn(3, 24))
    assert len(calls) == 2
    layer.eval()
    layer(torch.randn(3, 24))  # the last training refresh was not checked: check it now
    assert len(calls) == 3
    layer(torch.randn(3, 24))  # nothing changed: no refresh, no check
    assert len(calls) == 3
    with torch.no_grad():
        original.add_(1e-3 * torch.randn_like(original))
    layer(torch.randn(3, 24))
    assert len(calls) == 4


def test_the_check_on_a_convolution_stays_under_its_second_singular_value():
    from torch.nn.functional import conv2d

    from pyro_invres.nn.spectral import ConvSpectralNormScale

    torch.manual_seed(6)
    kernel = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    sn = ConvSpectralNormScale(kernel, 1.0, (2, 5, 5), padding=1)
    assert sn.refresh(kernel, max_iterations=500, check=True)

    def conv(x: torch.Tensor) -> torch.Tensor:
        return conv2d(x.view(1, 2, 5, 5), kernel, padding=1).flatten()

    matrix = torch.autograd.functional.jacobian(conv, torch.zeros(50, dtype=torch.float64))
    s = torch.linalg.svdvals(matrix)
    assert float(sn.sigma(kernel)) == pytest.approx(float(s[0]), rel=1e-8)
    other, vector = sn.complement_sigma(kernel, 1e-10)
    assert vector is not None and other <= float(s[1]) * (1 + 1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_convolution_stalled_at_its_second_singular_value_is_caught(dtype):
    # the torch path with the convolution as the operator: a warm start on the second
    # singular vector of the brute-force operator matrix stalls there unless checked
    from torch.nn.functional import conv2d

    from pyro_invres.nn.spectral import ConvSpectralNormScale

    torch.manual_seed(6)
    kernel = torch.randn(3, 2, 3, 3, dtype=torch.float64)

    def conv(x: torch.Tensor) -> torch.Tensor:
        return conv2d(x.view(1, 2, 5, 5), kernel, padding=1).flatten()

    matrix = torch.autograd.functional.jacobian(conv, torch.zeros(50, dtype=torch.float64))
    left, s, right = torch.linalg.svd(matrix)
    assert float(s[0]) > float(s[1]) * 1.05
    kernel = kernel.to(dtype)
    sn = ConvSpectralNormScale(kernel, 1.0, (2, 5, 5), padding=1)
    for check, expected in ((False, s[1]), (True, s[0])):
        sn.u.copy_(left[:, 1])
        sn.v.copy_(right[1])
        assert sn.refresh(kernel, max_iterations=500, check=check)
        assert float(sn.sigma(kernel)) == pytest.approx(float(expected), rel=1e-5)


def test_a_stall_on_the_output_side_is_caught_and_a_checked_state_is_left_unchanged():
    # out < in: Lanczos and the check run on W W^T (the ``u`` side)
    weight, u, v = _known_svd(64, 40, (2.0, 1.96), torch.float32)
    weight, u, v = weight.T.contiguous(), v, u
    sn = SpectralNormScale(weight, 1.0)
    assert sn.u.numel() < sn.v.numel()
    sn.u.copy_(u[:, 1])
    sn.v.copy_(v[:, 1])
    assert sn.refresh(weight, max_iterations=200, check=True)
    assert float(sn.sigma(weight)) == pytest.approx(2.0, rel=1e-5)
    kept = sn.u.clone(), sn.v.clone()
    assert sn.refresh(weight, max_iterations=200, check=True)
    assert torch.equal(sn.u, kept[0]) and torch.equal(sn.v, kept[1])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_keeps_the_vectors_and_the_check_schedule_of_the_original(how):
    # Registering the parametrization on the copy runs it once (torch checks the shape),
    # which refreshed the copy's vectors: one capped step further for an unconverged
    # state, and one refresh ahead in the check schedule, so the copy and the original
    # then computed different layers.
    import copy
    import pickle

    def clone(module: torch.nn.Module) -> torch.nn.Module:
        if how == "deepcopy":
            return copy.deepcopy(module)
        return pickle.loads(pickle.dumps(module))

    torch.manual_seed(3)
    layer = spectral_norm(torch.nn.Linear(200, 256), 0.9, n_power_iterations=1)
    original = layer.parametrizations.weight.original
    with torch.no_grad():
        original.mul_(3).add_(torch.randn_like(original))
    x = torch.randn(3, 200)
    layer(x)
    assert not _param(layer)._converged  # a capped state
    assert torch.equal(clone(layer)(x), layer(x))

    # a stall in training: the check of the original's next refresh catches it
    layer = spectral_norm(torch.nn.Linear(40, 64), 0.9)
    sn = _param(layer)
    weight, u, v = _known_svd(64, 40, (2.0, 1.96), torch.float32)
    original = layer.parametrizations.weight.original
    with torch.no_grad():
        original.copy_(weight)
    sn.u.copy_(u[:, 1])
    sn.v.copy_(v[:, 1])
    sn._mark_seen(original)
    sn.__dict__.update(_converged=True, _refreshes=spectral._CHECK_EVERY - 1)
    other = clone(layer)
    step = 1e-4 * torch.randn_like(weight)
    for module in (layer, other):
        module.parametrizations.weight.original.data.add_(step)
    assert torch.equal(other(x[:, :40]), layer(x[:, :40]))
    assert _norm(layer.weight) <= 0.9 * (1 + 1e-5)


def test_a_layer_pickled_before_the_check_existed_loads_and_is_checked():
    import pickle

    torch.manual_seed(4)
    layer = spectral_norm(torch.nn.Linear(40, 64), 0.9)
    layer(torch.randn(2, 40))
    sn = _param(layer)
    for key in ("_checked", "_refreshes"):  # as pickled by the code before them
        del sn.__dict__[key]
    loaded = pickle.loads(pickle.dumps(layer)).eval()
    weight, u, v = _known_svd(64, 40, (2.0, 1.96), torch.float32)
    loaded.parametrizations.weight.original.data.copy_(weight)
    _param(loaded).u.copy_(u[:, 1])
    _param(loaded).v.copy_(v[:, 1])
    loaded(torch.randn(2, 40))
    assert _norm(loaded.weight) <= 0.9 * (1 + 1e-5)


def test_a_state_dict_with_stalled_vectors_is_checked_at_its_first_training_refresh():
    # vectors the digest cannot vouch for: a full refresh, checked, in training mode too
    layer = spectral_norm(torch.nn.Linear(40, 64), 0.9)
    weight, u, v = _known_svd(64, 40, (2.0, 1.96), torch.float32)
    state = layer.state_dict()
    state["parametrizations.weight.original"] = weight
    state["parametrizations.weight.0.u"] = u[:, 1].clone()
    state["parametrizations.weight.0.v"] = v[:, 1].clone()
    layer.load_state_dict(state)
    assert layer.training and _param(layer)._full_refresh
    layer(torch.randn(2, 40))
    assert _norm(layer.weight) <= 0.9 * (1 + 1e-5)
