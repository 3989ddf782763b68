import numpy as np
import pytest

from pinsface.backbones import dlib_resnet, get_backbone
from pinsface.embeddings import Embedder, resolve_precision


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_keras_rebuild_matches_dlib_descriptors(backbone, reference_chips, precision):
    chips = reference_chips["chips"]
    expected = reference_chips["descriptors"]
    got = Embedder(backbone, batch_size=32, precision=precision)(chips)
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    distance = np.linalg.norm(got - expected, axis=1)
    assert len(chips) == 105
    assert cosine.min() >= 0.999, cosine.min()
    assert distance.max() <= 0.06, distance.max()
    # Different people stay apart by dlib's own 0.6 rule, so the space is the one its threshold is made for.
    d = np.linalg.norm(got[:, None] - got[None], axis=2)[np.triu_indices(len(got), 1)]
    assert np.mean(d > dlib_resnet.SAME_PERSON_DISTANCE) > 0.95


def test_embedder_batches_and_flips_consistently(backbone, reference_chips):
    chips = reference_chips["chips"][:10]
    embedder = Embedder(backbone, batch_size=4)  # 10 is not a multiple of 4: the last batch is padded
    one_by_one = np.stack([Embedder(backbone, batch_size=1)(c[None])[0] for c in chips[:3]])
    assert np.allclose(embedder(chips)[:3], one_by_one, atol=1e-4)
    assert np.allclose(embedder(chips, flip=True), embedder(chips[:, :, ::-1]), atol=1e-5)


def test_embedding_precision_is_resolved_and_checked():
    assert resolve_precision("auto") in ("float32", "bfloat16")
    assert resolve_precision("float32") == "float32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("float16")


def test_weights_are_checked_against_their_checksum(monkeypatch):
    dlib_resnet.load_weight_map.cache_clear()
    monkeypatch.setitem(dlib_resnet.SHA256, dlib_resnet.WEIGHTS_FILE, "0" * 64)
    with pytest.raises(dlib_resnet.WeightsError, match="checksum mismatch"):
        dlib_resnet.load_weight_map()
    dlib_resnet.load_weight_map.cache_clear()


def test_unknown_backbone_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone"):
        get_backbone("resnet-9000")


def test_tensorflow_loads_without_kerass_optional_imports_which_still_work_after():
    import subprocess
    import sys

    code = (
        "import sys, pinsface.layers, keras; assert 'sklearn' not in sys.modules and 'matplotlib.pyplot' not in "
        "sys.modules; import sklearn.metrics, matplotlib.pyplot; print(sklearn.metrics.accuracy_score([1], [1]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "1.0"
