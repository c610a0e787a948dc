"""The SecAgg+ mask generator: uniform, seed-sensitive in every byte, and what both sides use."""

import numpy as np
import pytest

from veil.fl.secagg import install, mask_prg


def test_masks_are_deterministic_per_seed_and_shaped():
    dims = [(3, 4), (), (7,)]
    a = mask_prg(b"k" * 32, 2 ** 32, dims)
    b = mask_prg(b"k" * 32, 2 ** 32, dims)
    assert [x.shape for x in a] == [(3, 4), (), (7,)]
    assert all(x.dtype == np.int64 and np.array_equal(x, y) for x, y in zip(a, b))


def test_seeds_that_flower_folds_to_one_32_bit_value_give_different_masks():
    # Flower 1.41 XORs the seed's 4-byte words into a 32-bit seed: these two seeds collide there
    s1 = bytes(range(32))
    s2 = bytes(range(4, 8)) + bytes(range(4)) + bytes(range(8, 32))
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    assert np.array_equal(pseudo_rand_gen(s1, 2 ** 32, [(8,)])[0], pseudo_rand_gen(s2, 2 ** 32, [(8,)])[0])
    assert not np.array_equal(mask_prg(s1, 2 ** 32, [(8,)])[0], mask_prg(s2, 2 ** 32, [(8,)])[0])


def test_masks_are_uniform_over_the_range():
    x = mask_prg(b"\x01" * 32, 2 ** 32, [(200_000,)])[0]
    assert x.min() >= 0 and x.max() < 2 ** 32
    counts = np.bincount((x >> 28).astype(np.int64), minlength=16)  # 16 equal bins
    expected = len(x) / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7  # 15 degrees of freedom, p = 0.001
    small = mask_prg(b"\x02" * 32, 2 ** 4, [(50_000,)])[0]
    assert set(np.unique(small)) == set(range(16))


def test_bad_range_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        mask_prg(b"s", 1000, [(2,)])


def test_install_reaches_both_sides():
    import importlib
    client_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    server_workflow = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    install()
    assert client_mod.pseudo_rand_gen is mask_prg
    assert server_workflow.pseudo_rand_gen is mask_prg
