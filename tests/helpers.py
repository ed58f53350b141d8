"""Reference computations shared by the tests (float64, autograd)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pyro
import pytest
import torch


def jacobian_logdet(fn, x: torch.Tensor, event_dim: int = 1) -> torch.Tensor:
    """log|det d fn / dx| per sample, by the full autograd Jacobian of the flattened map."""
    batch_shape = x.shape[: x.dim() - event_dim]
    event_shape = x.shape[x.dim() - event_dim :]
    flat = x.reshape(-1, *event_shape)
    out = []
    for xi in flat:
        jac = torch.autograd.functional.jacobian(lambda z: fn(z.reshape(event_shape)), xi)
        d = xi.numel()
        out.append(torch.linalg.slogdet(jac.reshape(d, d)).logabsdet)
    return torch.stack(out).reshape(batch_shape) if out else x.new_zeros(batch_shape)


def residual_lipschitz(g, x: torch.Tensor) -> torch.Tensor:
    """Largest spectral norm of J_g over the rows of x (flattened events)."""
    worst = x.new_zeros(())
    for xi in x.reshape(-1, x.shape[-1]):
        jac = torch.autograd.functional.jacobian(g, xi)
        worst = torch.maximum(worst, torch.linalg.matrix_norm(jac, ord=2))
    return worst


def seeded_outputs(t, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Forward, inverse and both log-dets of transform ``t``, each on a fresh tensor after a
    fixed seed (stochastic log-dets then reproduce), detached."""
    torch.manual_seed(7)
    fx = t(x.clone())
    torch.manual_seed(8)
    ladj_fx = t.log_abs_det_jacobian(x, fx)
    torch.manual_seed(9)
    iy = t.inv(y.clone())
    torch.manual_seed(10)
    ladj_iy = t.log_abs_det_jacobian(iy, y)
    return [v.detach() for v in (fx, ladj_fx, iy, ladj_iy)]


def one_line_error(capsys, argv, *needles: str, status: int = 1) -> str:
    """Run ``pyro-invres`` with ``argv``: exit ``status``, one line on stderr that starts
    ``pyro-invres <command>: error:`` and holds every needle, no traceback."""
    from pyro_invres.cli import main

    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"pyro-invres {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def restored_threads_and_param_store():
    """Give the test torch's thread count back and leave Pyro's param store empty (the
    benchmark scripts under test set one thread and train guides)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    pyro.clear_param_store()


BENCHMARKS = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"


def load_benchmark(name: str, module_name: str | None = None) -> ModuleType:
    """``examples/benchmarks/<name>.py`` as a module (its folder on the path while it loads,
    for its ``from common import ...``), without running its ``main``."""
    path = BENCHMARKS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name or name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module
