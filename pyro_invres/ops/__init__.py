"""The maths of invertible residual blocks as small pure functions taking callables."""

from .fixed_point import (
    SOLVER_METHODS,
    Anderson,
    ConvergenceError,
    ConvergenceWarning,
    FixedPoint,
    Newton,
    SolveInfo,
    default_tolerances,
    solve_fixed_point,
)
from .implicit import residual_inverse
from .logdet import (
    Auto,
    Exact,
    Roulette,
    Series,
    logdet_exact,
    logdet_from_jacobian,
    logdet_roulette,
    logdet_series,
    make_vjp,
    roulette_tail_probability,
    sample_probes,
    series_truncation_bound,
)

__all__ = [
    "SOLVER_METHODS",
    "Anderson",
    "Auto",
    "ConvergenceError",
    "ConvergenceWarning",
    "Exact",
    "FixedPoint",
    "Newton",
    "Roulette",
    "Series",
    "SolveInfo",
    "default_tolerances",
    "logdet_exact",
    "logdet_from_jacobian",
    "logdet_roulette",
    "logdet_series",
    "make_vjp",
    "residual_inverse",
    "roulette_tail_probability",
    "sample_probes",
    "series_truncation_bound",
    "solve_fixed_point",
]
