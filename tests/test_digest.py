"""The value digest the block cache compares: every change of a value is seen (issue 18)."""

import pytest
import torch

from pyro_invres.ops import digest
from pyro_invres.ops.digest import value_digest


def test_small_cpu_groups_are_their_exact_bytes():
    # up to 64 KiB the digest is the raw bytes: nothing but identical bits compares equal
    w = torch.randn(64, 64, requires_grad=True)
    assert w.numel() * w.element_size() <= digest._RAW_BYTES_MAX
    (entry,) = value_digest([w])
    assert entry == w.detach().numpy().tobytes()


@pytest.mark.parametrize("numel", [16, 4096, 200_000])  # bytes, bytes, weighted product
@pytest.mark.parametrize(
    "change",
    ["sign of zero", "one ulp", "swap two entries"],
)
def test_writes_through_data_change_the_digest(numel, change):
    torch.manual_seed(0)
    w = torch.randn(numel)
    w[0] = 0.0
    other = torch.randn(7, dtype=torch.float64)  # a second group
    before = value_digest([w, other])
    version = w._version
    if change == "sign of zero":
        w.data[0] = -0.0  # equal as a number, different bits (1 / w differs)
    elif change == "one ulp":
        w.data[numel // 2] = torch.nextafter(w[numel // 2], torch.tensor(float("inf")))
    else:
        w.data[[1, 2]] = w.data[[2, 1]]  # same sum and norm
    assert w._version == version  # invisible to the version counter
    assert value_digest([w, other]) != before


def test_one_entry_per_dtype_and_every_dtype_has_bytes():
    tensors = [
        torch.randn(3),
        torch.tensor(True),
        torch.randn(2, dtype=torch.bfloat16),
        torch.arange(4),
        torch.randn(2),
    ]
    d = value_digest(tensors)
    assert len(d) == 4  # float32 (two tensors, in order), bool, bfloat16, int64
    flipped = [tensors[0], torch.tensor(False), *tensors[2:]]
    assert value_digest(flipped) != d
    swapped = [tensors[4], tensors[1], tensors[2], tensors[3], tensors[0]]
    assert value_digest(swapped) != d  # the order of the tensors counts


def test_large_groups_keep_the_weighted_product():
    w = torch.randn(digest._RAW_BYTES_MAX // 4 + 1)
    (entry,) = value_digest([w])
    assert isinstance(entry, int)
