"""Degenerate data get a clear error from fit_density, never a fit that "succeeds".

Regression for issue 13, item 13: a flow fitted to data with a constant column trained to
losses of 1e6-1e21 and ``fit_density`` returned normally. A constant column (or one that
is a linear function of others) has no density; the fit must refuse it before training,
naming the columns, and a fit whose loss or ActNorm scales run away must stop with the
same error instead of returning.
"""

from __future__ import annotations

import math

import pytest
import torch

from pyro_invres import residual_flow
from pyro_invres.train import (
    DegenerateDataError,
    NonFiniteLossError,
    _DegeneracyWatch,
    build_flow,
    fit_density,
)


def moons_like(n: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * math.pi
    return torch.stack([t.cos(), t.sin()], -1) + 0.1 * torch.randn(n, 2, generator=g)


def small_flow(dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_flow("iresnet", dim, num_blocks=1, hidden_dims=[8])


def column(value: float, n: int = 400, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full((n, 1), value, dtype=dtype)


@pytest.mark.parametrize(
    "make, columns",
    [
        (lambda x: torch.cat([x, column(3.0)], 1), [2]),
        (lambda x: torch.cat([column(0.0), x, column(-7.5)], 1), [0, 3]),
        # varying only in the last bits of float32 around 1000: no spread either
        (lambda x: torch.cat([x, 1000.0 + 1e-5 * torch.randn(len(x), 1)], 1), [2]),
        (lambda x: torch.cat([x, column(1.0, dtype=torch.float64)], 1).double(), [2]),
    ],
    ids=["constant", "two-constant", "float32-rounding", "float64"],
)
def test_constant_columns_are_refused_before_training(make, columns, tmp_path):
    torch.manual_seed(0)
    data = make(moons_like())
    flow = small_flow(data.shape[1]).to(data.dtype)
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    path = tmp_path / "c.pt"
    with pytest.raises(DegenerateDataError) as info:
        fit_density(flow, data, steps=50, checkpoint_path=path, progress=False)
    err = info.value
    assert err.columns == columns and err.step is None
    named = ", ".join(str(c) for c in columns)
    assert f"column{'s' if len(columns) > 1 else ''} {named} " in str(err), str(err)
    assert "no spread" in str(err)
    assert isinstance(err, ValueError)
    # before training: nothing trained, nothing written
    assert not path.exists()
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())


def test_constant_pixel_of_image_data_is_named_by_its_index():
    torch.manual_seed(0)
    data = torch.rand(64, 1, 4, 4)
    data[:, 0, 1, 2] = 0.5
    flow = residual_flow((1, 4, 4), num_blocks=1, hidden_dims=[4], num_scales=1, explicit="inverse")
    with pytest.raises(DegenerateDataError) as info:
        fit_density(flow, data, steps=5, progress=False)
    assert info.value.columns == [(0, 1, 2)]
    assert "element (0, 1, 2) has no spread" in str(info.value)


def test_linearly_dependent_columns_are_refused_naming_them():
    x = moons_like()
    data = torch.cat([x, 2.0 * x[:, :1] + 1.0], 1)  # column 2 = 2 * column 0 + 1
    with pytest.raises(DegenerateDataError) as info:
        fit_density(small_flow(3), data, steps=50, progress=False)
    assert info.value.columns == [0, 2]
    assert "columns 0, 2 are linear functions of one another" in str(info.value)


def test_ordinary_data_pass_the_checks():
    """Correlated (not dependent), tightly clustered and badly scaled columns are fine."""
    torch.manual_seed(1)
    x = moons_like()
    data = torch.cat(
        [x, x[:, :1] + 0.05 * torch.randn(len(x), 1), 1e4 + 3.0 * torch.randn(len(x), 1)], 1
    )
    result = fit_density(small_flow(4), data, steps=3, batch_size=64, progress=False)
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)


def test_non_finite_data_still_stop_at_step_one():
    data = moons_like()
    data[5, 1] = float("nan")
    with pytest.raises(NonFiniteLossError):
        fit_density(small_flow(2), data, steps=5, progress=False)


def test_a_runaway_loss_stops_training_with_the_step(tmp_path):
    """A column with a real but float-level spread far from zero passes the check before
    training; Adam's first steps on its ActNorm bias then move it by thousands of its
    standard deviations. Before, the fit returned with losses of 1e3-1e5; now it stops."""
    torch.manual_seed(0)
    x = moons_like(1000)
    data = torch.cat([x, 1000.0 + 1e-4 * torch.randn(1000, 1)], 1)
    path = tmp_path / "c.pt"
    with (
        pytest.raises(DegenerateDataError) as info,
        pytest.warns(UserWarning, match="column 2 varies by fewer than 64 float spacings"),
    ):
        fit_density(
            small_flow(3),
            data,
            steps=200,
            batch_size=64,
            lr=1e-1,
            checkpoint_path=path,
            checkpoint_every=1,
            progress=False,
        )
    err = info.value
    assert err.step is not None and err.step >= 2 and err.columns == [2]
    assert "nearly constant: data column 2" in str(err)
    assert "1000 nats per dimension above" in str(err) and f"at step {err.step}" in str(err)
    # the last checkpoint is from the step before: the runaway step was never written
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == err.step - 1


def test_watch_stops_a_loss_below_float_resolution_and_an_exploding_actnorm():
    """The two other signs, on a flow whose state is set by hand."""
    flow = small_flow(2)
    watch = _DegeneracyWatch(flow, gaussian_nll=2.0, event_shape=(2,))
    watch.check(1, 2.1, "")  # an ordinary loss
    floor = 2.0 - 2 * -math.log(torch.finfo(torch.float32).eps)
    with pytest.raises(DegenerateDataError, match="below"):
        watch.check(2, floor - 1.0, "")
    watch = _DegeneracyWatch(flow, gaussian_nll=2.0, event_shape=(2,))
    with torch.no_grad():
        flow[-1].log_scale[1] -= 20.0  # the data-side ActNorm squeezes column 1 by e^20
    with pytest.raises(DegenerateDataError) as info:
        watch.check(7, 2.0, "")
    assert info.value.columns == [1] and info.value.step == 7
    assert "the scale of data column 1 changed" in str(info.value)
