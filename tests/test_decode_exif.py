"""decode_table turns phone photos upright by their EXIF orientation and can resize by short side."""

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from iqa_ray.data.decoded import decode_table, short_side_size

ORIENTATION = 0x0112


def quadrant_image(width, height):
    """A stored image with four flat colour blocks: red top-left, green top-right, blue bottom-left,
    white bottom-right (flat blocks survive JPEG almost exactly, so positions can be checked)."""
    a = np.zeros((height, width, 3), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    a[:h2, :w2] = (255, 0, 0)
    a[:h2, w2:] = (0, 255, 0)
    a[h2:, :w2] = (0, 0, 255)
    a[h2:, w2:] = (255, 255, 255)
    return a


def save_jpeg(path, array, orientation=None):
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    Image.fromarray(array).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def table(paths):
    return pd.DataFrame({"image_id": [f"im{i}" for i in range(len(paths))], "split": "train", "mos": 50.0,
                         "path": [str(p) for p in paths]})


def stored_pixels(path):
    """The JPEG's pixels as stored, EXIF ignored."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def colour_at(image, y, x):
    return tuple(int(v) for v in image[y, x])


def close(a, b, tol=12):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_exif_rotate_90_comes_out_upright(tmp_path):
    # Orientation 6: the stored pixels must be turned 90 degrees clockwise to stand upright.
    src = quadrant_image(96, 64)  # stored landscape, 96 wide x 64 high
    path = save_jpeg(tmp_path / "phone.jpg", src, orientation=6)
    decoded = decode_table(table([path]))
    image = decoded.images[0]
    assert image.shape == (96, 64, 3)  # transposed: 64 wide x 96 high
    # Exactly the stored pixels turned clockwise (the transpose itself is lossless).
    assert np.array_equal(image, np.rot90(stored_pixels(path), k=-1))
    # And in terms of the content: after a clockwise turn the stored top-left (red) is top-right,
    # stored top-right (green) is bottom-right, bottom-left (blue) is top-left, white bottom-left.
    assert close(colour_at(image, 10, 54), (255, 0, 0))
    assert close(colour_at(image, 85, 54), (0, 255, 0))
    assert close(colour_at(image, 10, 10), (0, 0, 255))
    assert close(colour_at(image, 85, 10), (255, 255, 255))


@pytest.mark.parametrize("orientation, turn", [(3, lambda a: np.rot90(a, 2)), (8, lambda a: np.rot90(a, 1)),
                                               (2, lambda a: a[:, ::-1])])
def test_other_orientations(tmp_path, orientation, turn):
    path = save_jpeg(tmp_path / f"o{orientation}.jpg", quadrant_image(96, 64), orientation=orientation)
    image = decode_table(table([path])).images[0]
    assert np.array_equal(image, turn(stored_pixels(path)))


def test_no_orientation_or_orientation_1_keeps_pixels_as_stored(tmp_path):
    plain = save_jpeg(tmp_path / "plain.jpg", quadrant_image(96, 64))
    one = save_jpeg(tmp_path / "one.jpg", quadrant_image(96, 64), orientation=1)
    decoded = decode_table(table([plain, one]))
    assert decoded.images.shape == (2, 64, 96, 3)
    assert np.array_equal(decoded.images[0], stored_pixels(plain))
    assert np.array_equal(decoded.images[1], stored_pixels(one))


def test_orientation_is_applied_to_encoded_bytes_too(tmp_path):
    path = save_jpeg(tmp_path / "phone.jpg", quadrant_image(96, 64), orientation=6)
    rows = pd.DataFrame({"image_id": ["a"], "split": ["train"], "mos": [50.0], "image": [path.read_bytes()]})
    image = decode_table(rows).images[0]
    assert np.array_equal(image, np.rot90(stored_pixels(path), k=-1))


def test_image_size_applies_to_the_upright_image(tmp_path):
    path = save_jpeg(tmp_path / "phone.jpg", quadrant_image(96, 64), orientation=6)
    image = decode_table(table([path]), image_size=(32, 48)).images[0]
    assert image.shape == (48, 32, 3)


def test_short_side_resizes_keeping_the_aspect(tmp_path):
    wide = save_jpeg(tmp_path / "wide.jpg", quadrant_image(300, 200))
    tall = save_jpeg(tmp_path / "tall.jpg", quadrant_image(200, 300))
    decoded = decode_table(table([wide, tall]), short_side=128)
    assert decoded.images[0].shape == (128, 192, 3)
    assert decoded.images[1].shape == (192, 128, 3)
    # Content is resized, not cropped: the red block still fills the top-left quarter.
    assert close(colour_at(decoded.images[0], 20, 20), (255, 0, 0))
    assert close(colour_at(decoded.images[0], 108, 172), (255, 255, 255))


def test_short_side_after_orientation_and_no_op_when_already_that_size(tmp_path):
    phone = save_jpeg(tmp_path / "phone.jpg", quadrant_image(300, 200), orientation=6)  # upright 200x300
    assert decode_table(table([phone]), short_side=128).images[0].shape == (192, 128, 3)
    exact = save_jpeg(tmp_path / "exact.jpg", quadrant_image(192, 128))
    image = decode_table(table([exact]), short_side=128).images[0]
    assert np.array_equal(image, stored_pixels(exact))


def test_short_side_size_arithmetic():
    assert short_side_size(300, 200, 128) == (192, 128)
    assert short_side_size(200, 300, 128) == (128, 192)
    assert short_side_size(1024, 768, 384) == (512, 384)
    assert short_side_size(100, 100, 200) == (200, 200)  # scales up too
    assert short_side_size(4000, 3000, 512) == (683, 512)


def test_image_size_and_short_side_together_is_refused(tmp_path):
    path = save_jpeg(tmp_path / "a.jpg", quadrant_image(96, 64))
    with pytest.raises(ValueError, match=r"image_size.*short_side"):
        decode_table(table([path]), image_size=(64, 64), short_side=64)
    with pytest.raises(ValueError, match="short_side must be a positive integer"):
        decode_table(table([path]), short_side=0)


def test_png_bytes_without_exif_unchanged():
    buf = io.BytesIO()
    src = quadrant_image(40, 30)
    Image.fromarray(src).save(buf, format="PNG")
    rows = pd.DataFrame({"image_id": ["a"], "split": ["train"], "mos": [1.0], "image": [buf.getvalue()]})
    assert np.array_equal(decode_table(rows).images[0], src)
