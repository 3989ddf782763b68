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


def test_tune_scores_each_setting_and_chooses_by_the_rule(cluster_bench, monkeypatch):
    from pinsface import library_cluster as lc

    rng = np.random.default_rng(2)
    val, draw = people(rng, [6, 7, 8], spread=0.15), people(rng, [5, 6, 4], spread=0.15)
    tail = people(rng, [3, 1, 2, 1, 1, 2], spread=0.15)
    monkeypatch.setattr(cluster_bench, "TUNE_GRID", ([0.62], [0.01, 0.42], [0.05], [0.7], [0.64]))
    before = lc.SMALL_GROUPS
    rows = cluster_bench.tune_rows(val, [draw], [tail])
    assert lc.SMALL_GROUPS == before and [r[0]["SMALL_GROUPS"] for r in rows] == [0.61, 0.2]
    # Far-apart people: the pair bound 0.42 finds them whole, 0.01 never starts a group.
    assert rows[1][1] == (1.0, 1.0, 1.0) and rows[1][2] == [1.0] and rows[1][4] == 1.0
    assert rows[0][1][1] < 0.5 and rows[0][4] < 1.0
    assert cluster_bench.tune_choice(rows, floor=0.0)[0]["SMALL_GROUPS"] == 0.2
    assert cluster_bench.tune_choice(rows, floor=1.0) is None  # no long-tail F1 above the floor
