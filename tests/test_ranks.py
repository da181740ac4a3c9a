import numpy as np
import pytest

from lowrank_fm.ranks import energy_kept, rank_for_energy


def test_rank_for_energy_is_smallest_rank_reaching_the_share():
    values = np.array([50.0, 30.0, 10.0, 6.0, 4.0])
    assert rank_for_energy(values, 0.5) == 1
    assert rank_for_energy(values, 0.8) == 2
    assert rank_for_energy(values, 0.81) == 3
    assert rank_for_energy(values, 0.96) == 4
    assert rank_for_energy(values, 1.0) == 5
    assert energy_kept(values, 2) == pytest.approx(0.8)


def test_energy_one_keeps_full_rank_even_with_zero_tail():
    assert rank_for_energy(np.array([3.0, 1.0, 0.0, 0.0]), 1.0) == 4


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.5])
def test_energy_out_of_range_raises(energy):
    with pytest.raises(ValueError, match="0 < energy <= 1"):
        rank_for_energy(np.ones(3), energy)
