import os

import pyro
import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "20")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile("thorough", max_examples=200, deadline=None, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# small tensors: one thread avoids oversubscription on a loaded 2-core runner
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


def inflate(module: torch.nn.Module, factor: float = 5.0) -> None:
    """Scale every weight up so the spectral normalisation is active, not a formality.

    PyTorch's default initialisation of small layers is already contractive, so a test of
    the Lipschitz bound must first push the weights past it.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "original" in name or name.endswith("weight"):
                p.mul_(factor)


def requires_cuda():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
