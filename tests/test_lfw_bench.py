"""bench/lfw.py on an LFW-format folder built by bench/lfw_pins.py from the shared Pins test split."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pinsface.dataset import assign_split
from pinsface.settings import Settings

BENCH = Path(__file__).resolve().parents[1] / "bench"
ROW = re.compile(
    r"^(pinsface plain|pinsface mirror-averaged)\s+([\d.]+) ± ([\d.]+)\s+([\d.]+) \(\s*([\d.]+)\).*?(\d+) no face"
)


def bench(script: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )


@pytest.fixture(scope="module")
def small_lfw(tmp_path_factory, pins_dir) -> Path:
    dest = tmp_path_factory.mktemp("lfw") / "pins-lfw"
    proc = bench("lfw_pins.py", dest, "--data", pins_dir, "--folds", 2, "--pairs-per-fold", 20)
    assert proc.returncode == 0, proc.stderr
    return dest


def test_pairs_are_lfw_format_from_the_test_split_with_identity_disjoint_folds(small_lfw, pins_dir):
    lines = [line.split("\t") for line in (small_lfw / "pairs.txt").read_text(encoding="utf-8").splitlines()]
    assert lines[0] == ["2", "20"] and len(lines) == 1 + 2 * 2 * 20
    defaults = Settings()
    names_per_fold = []
    for fold in range(2):
        block = lines[1 + 80 // 2 * fold : 1 + 80 // 2 * (fold + 1)]
        matched, mismatched = block[:20], block[20:]
        assert all(len(p) == 3 and p[1] != p[2] for p in matched)
        assert all(len(p) == 4 and p[0] != p[2] for p in mismatched)
        assert len({tuple(p) for p in block}) == 40  # no pair drawn twice
        names_per_fold.append({p[0] for p in matched} | {p[0] for p in mismatched} | {p[2] for p in mismatched})
        second = [(p[0], p[2]) for p in matched] + [(p[2], p[3]) for p in mismatched]
        for name, number in [(p[0], p[1]) for p in block] + second:
            image = small_lfw / name / f"{name}_{int(number):04d}.jpg"
            rel = image.resolve().relative_to(pins_dir.resolve()).as_posix()
            assert assign_split(rel, defaults.seed, defaults.test_fraction, defaults.val_fraction) == "test"
    assert not names_per_fold[0] & names_per_fold[1]


def test_lfw_bench_runs_the_protocol_through_the_public_api(small_lfw):
    proc = bench("lfw.py", "--lfw", small_lfw, "--pairs", small_lfw / "pairs.txt", "--no-dlib")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("80 pairs in 2 folds, ")
    rows = {m.group(1): m.groups()[1:] for m in map(ROW.match, out.splitlines()) if m}
    assert set(rows) == {"pinsface plain", "pinsface mirror-averaged"}, out
    n_images = int(re.search(r"(\d+) images", out).group(1))
    for mean, std, threshold, best, no_face in rows.values():
        assert 80 < float(mean) <= 100 and float(std) < 20
        assert 80 < float(best) <= 100 and 0.3 < float(threshold) < 1.0
        assert int(no_face) <= n_images // 10
    assert "dlib's own pipeline: not run (--no-dlib)" in out
    at_default = re.search(r"VERIFY_THRESHOLD ([\d.]+)\) on all pairs, .* accuracy ([\d.]+)$", out, re.M)
    assert at_default and 80 < float(at_default.group(2)) <= 100


def test_lfw_bench_names_a_malformed_pairs_line(small_lfw, tmp_path):
    pairs = tmp_path / "pairs.txt"
    lines = (small_lfw / "pairs.txt").read_text(encoding="utf-8").splitlines()
    lines[3] = lines[3] + "\t7"  # a matched line with a mismatched pair's field count
    pairs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = bench("lfw.py", "--lfw", small_lfw, "--pairs", pairs, "--no-dlib")
    assert proc.returncode != 0
    assert "line 4: expected a matched 'name n1 n2' pair" in proc.stderr
