import numpy as np
import pytest
from PIL import Image

from pinsface.images import BadImage, load_image
from pinsface.testing.badinput import BAD, SOURCE, make_bad_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, pins_dir):
    source = pins_dir.joinpath(*SOURCE)
    return make_bad_corpus(tmp_path_factory.mktemp("bad"), source), source


@pytest.mark.parametrize("name,reason", sorted(BAD.items()))
def test_each_bad_file_fails_with_its_named_reason(corpus, name, reason):
    folder, _ = corpus
    with pytest.raises(BadImage) as err:
        load_image(folder / name)
    assert err.value.reason == reason


def test_bomb_is_refused_before_decoding(corpus):
    folder, _ = corpus
    with pytest.raises(BadImage) as err:
        load_image(folder / "bomb.png", max_pixels=10_000_000)
    assert "900000000" in str(err.value) or "pixels" in str(err.value)


@pytest.mark.parametrize("name", ["gray.png", "rgba.png", "palette.png", "sixteen_bit.png", "cmyk.jpg"])
def test_odd_modes_become_rgb_that_looks_like_the_original(corpus, name):
    folder, source = corpus
    image = load_image(folder / name)
    reference = np.asarray(Image.open(source).convert("L"), dtype=np.float32)
    assert image.dtype == np.uint8 and image.shape == (*reference.shape, 3)
    gray = image.astype(np.float32).mean(axis=2)
    # Same picture: strongly correlated with the source's luminance (alpha is composited on white).
    assert np.corrcoef(gray.ravel(), reference.ravel())[0, 1] > 0.9


def test_sixteen_bit_is_scaled_not_clipped(corpus):
    folder, source = corpus
    image = load_image(folder / "sixteen_bit.png")
    reference = np.asarray(Image.open(source).convert("L"), dtype=np.float32)
    assert abs(image[..., 0].astype(np.float32).mean() - reference.mean()) < 2


def test_exif_orientation_is_applied(corpus):
    folder, source = corpus
    image = load_image(folder / "exif_rotated.jpg")
    upright = np.asarray(Image.open(source).convert("RGB"), dtype=np.float32)
    assert image.shape == upright.shape
    assert np.abs(image.astype(np.float32) - upright).mean() < 6


def test_arrays_and_bytes_are_accepted(corpus):
    _, source = corpus
    from_bytes = load_image(source.read_bytes())
    from_path = load_image(source)
    assert np.array_equal(from_bytes, from_path)
    assert load_image(from_path[..., 0]).shape == from_path.shape
    with pytest.raises(BadImage):
        load_image(np.zeros((4, 4, 7), np.uint8))


def test_the_decode_caps_are_the_ones_named_in_settings():
    import inspect

    from pinsface import finding, images, settings
    from pinsface.serve.app import ServeSettings

    assert settings.FaceSettings().max_pixels == settings.MAX_PIXELS
    assert ServeSettings().max_pixels == settings.SERVE_MAX_PIXELS
    assert inspect.signature(images.decode_scaled).parameters["max_pixels"].default == settings.MAX_PIXELS
    assert finding.PHOTO_DECODE_MIN_SIDE == settings.DECODE_MIN_SIDE  # finding.py keeps its own name for now
