"""bench/cluster.py's scores and yardsticks, on faces whose answer is known."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "cluster.py"


@pytest.fixture(scope="module")
def cluster_bench():
    spec = importlib.util.spec_from_file_location("cluster_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def people(rng, sizes, spread=0.05) -> tuple[np.ndarray, np.ndarray]:
    """Faces of people far apart (a unit direction each, times 1), each face within ``spread`` of its person."""
    centres = rng.normal(size=(len(sizes), 128))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    owner = np.repeat(np.arange(len(sizes)), sizes)
    return centres[owner] + rng.normal(scale=spread / np.sqrt(128), size=(len(owner), 128)), owner


def test_bcubed_scores_a_split_person_and_a_joined_pair(cluster_bench):
    truth = np.array([0, 0, 0, 0, 1, 1])
    assert cluster_bench.bcubed(truth, truth) == (1.0, 1.0)
    p, r = cluster_bench.bcubed(np.array([0, 0, 1, 1, 2, 2]), truth)  # person 0 in two halves
    assert p == 1.0 and r == pytest.approx((4 * 0.5 + 2 * 1.0) / 6)
    p, r = cluster_bench.bcubed(np.zeros(6, int), truth)  # everyone together
    assert r == 1.0 and p == pytest.approx((4 * 4 / 6 + 2 * 2 / 6) / 6)


def test_known_people_bound_is_one_for_people_far_apart_and_less_for_a_lookalike(cluster_bench):
    rng = np.random.default_rng(0)
    x, owner = people(rng, [5, 6, 7])
    assert cluster_bench.known_people_bound(x, owner) == pytest.approx(1.0)
    # One of person 0's faces is in fact person 1's: no threshold places it with person 0.
    x[0] = x[owner == 1][0] + 0.01
    assert cluster_bench.known_people_bound(x, owner) < 0.98


def test_test_like_draws_copy_the_test_splits_sizes_from_the_train_split(cluster_bench, monkeypatch):
    rng = np.random.default_rng(1)
    train = people(rng, [20, 30, 25])
    test = people(rng, [4, 7, 5])
    monkeypatch.setattr(cluster_bench, "test_split", lambda data, part: {"train": train, "test": test}[part])
    draws = cluster_bench.test_like_draws(None, 3)
    assert len(draws) == 3
    for x, owner in draws:
        assert np.bincount(owner).tolist() == [4, 7, 5]
        # Each face is a train face, none twice.
        rows = [int(np.flatnonzero((train[0] == face).all(1))[0]) for face in x]
        assert len(set(rows)) == len(rows) and (train[1][rows] == owner).all()
    assert not np.array_equal(draws[0][0], draws[1][0])
