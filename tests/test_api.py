"""The public API (pinsface.describe, verify, ...), its errors, settings checked when built, and the CLI's
describe/verify, exit codes and light start-up, on real shared photos."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pinsface
from pinsface.cli import main
from pinsface.dataset import scan_dataset

PINSFACE = str(Path(sys.executable).parent / "pinsface")


def photos(pins_dir: Path, folder: str, n: int, start: int = 0) -> list[Path]:
    return sorted((pins_dir / folder).glob("*.jpg"))[start : start + n]


def test_import_and_help_do_not_load_tensorflow():
    code = "import sys, pinsface; print(sorted(m for m in ('tensorflow', 'keras', 'cv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
    code = (
        "import sys\nfrom pinsface.cli import main\nmain(['--help'])\n"
        "print('tf' if 'tensorflow' in sys.modules else 'none', file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "usage: pinsface" in out.stdout and out.stderr.strip().endswith("none"), out.stderr
    assert set(pinsface.__all__) <= set(dir(pinsface))


def test_describe_detect_and_verify_on_real_photos(pins_dir):
    gates = photos(pins_dir, "pins_Bill Gates", 4)
    lima = photos(pins_dir, "pins_Adriana Lima", 1)
    faces = pinsface.describe(gates[0])
    assert len(faces) >= 1 and sum(f.is_subject for f in faces) == 1
    subject = next(f for f in faces if f.is_subject)
    assert subject.descriptor.shape == (128,) and subject.box[2] > 40 and subject.box[3] > 40
    assert len(subject.landmarks) == 5 and 0.9 <= subject.score <= 1
    detected = pinsface.detect(gates[0].read_bytes())
    assert [d.box for d in detected] == [f.box for f in faces] and all(d.descriptor is None for d in detected)
    assert np.allclose(pinsface.describe(pinsface.load_image(gates[0]))[0].descriptor, faces[0].descriptor, atol=1e-3)
    # The threshold sits where a few percent of one person's pairs fall beyond it (docs/verification.md): most
    # pairs of one man's photos are called the same, every pair with a stranger's is not.
    same = [pinsface.verify(a, b) for a, b in itertools.combinations(gates, 2)]
    other = [pinsface.verify(g, lima[0]) for g in gates]
    assert sum(v.same for v in same) >= 5 and not any(v.same for v in other)
    assert np.median([v.distance for v in same]) < min(v.distance for v in other)
    assert {v.threshold for v in same + other} == {pinsface.api.VERIFY_THRESHOLD}
    assert pinsface.distance(subject, subject.descriptor) == 0
    record = json.loads(json.dumps(subject.to_dict()))
    assert set(record) == {"box", "landmarks", "score", "subject", "descriptor"} and len(record["descriptor"]) == 128


def test_errors_share_one_base_and_keep_their_builtin_types(tmp_path):
    with pytest.raises(pinsface.PinsfaceError) as caught:
        pinsface.describe(b"not an image at all")
    assert isinstance(caught.value, pinsface.BadImage) and caught.value.reason == "not_an_image"
    with pytest.raises(pinsface.NoFaceError):
        pinsface.verify(np.full((200, 200, 3), 128, np.uint8), np.full((200, 200, 3), 90, np.uint8))
    with pytest.raises(pinsface.DataNotFoundError) as missing:
        scan_dataset(tmp_path / "no such folder")
    assert isinstance(missing.value, FileNotFoundError)
    assert issubclass(pinsface.RunFolderError, ValueError) and issubclass(pinsface.BusyError, RuntimeError)


@pytest.mark.parametrize(
    "values",
    [
        {"model": "resnet"},
        {"final_fit": "train+test"},
        {"test_fraction": 0.6, "val_fraction": 0.5},
        {"epochs": 0},
        {"dropout": 1.5},
        {"mixup": 1.0, "class_weights": True},
        {"hidden_units": (512, -1)},
    ],
)
def test_settings_are_checked_when_built(values):
    with pytest.raises(pinsface.SettingsError):
        pinsface.Settings(**values)


def test_settings_refuse_unknown_keys_and_never_change(tmp_path):
    settings = pinsface.Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.epochs = 3
    data = settings.to_dict()
    assert pinsface.Settings.from_dict(data) == settings
    with pytest.raises(pinsface.SettingsError, match="unknown settings key"):
        pinsface.Settings.from_dict({**data, "epocs": 3})
    with pytest.raises(pinsface.SettingsError, match="unknown face settings key"):
        pinsface.Settings.from_dict({**data, "faces": {**data["faces"], "size": 3}})
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**data, "pinsface_version": pinsface.__version__, "epochs": 7}))
    assert pinsface.Settings.load(config).epochs == 7
    config.write_text(json.dumps({**data, "model": "resnet"}))
    # A bad --config is a usage error, found before any work starts (nothing is written).
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(config)]) == 2
    assert not (tmp_path / "run").exists()


def test_cli_describe_and_verify(pins_dir, tmp_path, capsys):
    gates = photos(pins_dir, "pins_Bill Gates", 2)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    assert main(["describe", str(gates[0]), str(bad), "--json", "-v"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["source"] == str(gates[0]) and len(lines[0]["faces"][0]["descriptor"]) == 128
    assert lines[1] == {"source": str(bad), "faces": [], "error": "empty_file"}
    assert main(["describe", str(gates[0]), str(bad), "--strict", "--no-descriptors"]) == 1
    assert main(["-v", "describe", str(bad)]) == 1  # every input failed
    capsys.readouterr()
    assert main(["verify", str(gates[0]), str(gates[1]), "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    expected = pinsface.verify(gates[0], gates[1])
    assert verdict["a"] == str(gates[0]) and verdict["b"] == str(gates[1])
    assert (verdict["same"], verdict["threshold"]) == (expected.same, expected.threshold)
    assert abs(verdict["distance"] - expected.distance) < 1e-3
    assert main(["verify", str(gates[0]), str(tmp_path / "missing.jpg")]) == 1
    assert "unreadable" in capsys.readouterr().err
    assert main(["verify", str(gates[0])]) == 2  # usage
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"pinsface {pinsface.__version__}"


def test_ctrl_c_exits_130_with_one_line_and_no_traceback(pins_dir, tmp_path):
    # Enough work that it is still running when the signal comes, on a fast idle machine too.
    files = [str(p) for p in photos(pins_dir, "pins_Adriana Lima", 60)] * 20
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Output to files, not pipes: a pipe nobody reads would block the child once it is full.
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        # SIGINT at its default in the child: a job started in the background (make test &) inherits it ignored.
        proc = subprocess.Popen(
            [PINSFACE, "describe", *files, "--json"],
            stdout=stdout,
            stderr=stderr,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + 300
        while not out.read_text().startswith("{") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # until the models are loaded and it is working
        assert out.read_text().startswith("{") and proc.poll() is None, err.read_text()
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        assert proc.returncode == 130, err.read_text()
        lines = err.read_text().strip().splitlines()
        assert "Traceback" not in err.read_text() and lines[-1].startswith("pinsface: interrupted")
    finally:
        proc.kill()
