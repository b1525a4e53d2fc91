import numpy as np
import pytest
from PIL import Image

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.sources import (
    decode_image_file,
    embedded_references,
    folder_references,
    hf_hub_references,
    load_reference,
    to_rgb_uint8,
)


def test_embedded_catalogue_is_real_photos_with_licences():
    refs = embedded_references()
    assert len(refs) >= 18
    keys = {r.key for r in refs}
    for must in ("skimage:astronaut", "skimage:chelsea", "skimage:coffee", "skimage:rocket",
                 "skimage:hubble_deep_field", "skimage:retina", "skimage:immunohistochemistry",
                 "skimage:motorcycle_left", "skimage:camera", "sklearn:china", "sklearn:flower"):
        assert must in keys
    assert len({r.group for r in refs}) == len(refs), "each photo is its own split group"
    for r in refs:
        assert r.licence and r.call and r.package in ("scikit-image", "scikit-learn")
        assert r.width >= 160 and r.height >= 160
    by_key = {r.key: r for r in refs}
    assert by_key["sklearn:china"].licence == "CC BY 2.0"
    assert by_key["skimage:chelsea"].licence == "CC0 1.0"
    assert by_key["skimage:camera"].grey and not by_key["skimage:astronaut"].grey


def test_embedded_photo_loads_as_rgb_uint8_of_catalogued_size():
    ref = next(r for r in embedded_references() if r.key == "skimage:camera")
    image = load_reference(ref)
    assert image.dtype == np.uint8 and image.shape == (ref.height, ref.width, 3)
    assert np.array_equal(image[..., 0], image[..., 2])  # grey replicated


def test_folder_source_lists_images_and_reports_unreadable_ones(tmp_path):
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((30, 30), 7, np.uint8)).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    (tmp_path / "notes.txt").write_text("ignored")
    refs, failed = folder_references(tmp_path)
    assert [r.key for r in refs] == ["a.png", "sub/b.jpg"]
    assert (refs[0].width, refs[0].height) == (50, 40) and refs[1].grey
    assert len(failed) == 1 and failed[0]["path"].endswith("broken.jpg") and failed[0]["error"]


def test_truncated_and_empty_files_raise_naming_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert decode_image_file(good).shape == (64, 64, 3)
    with pytest.raises(DatasetError, match="truncated.png"):
        decode_image_file(truncated)
    with pytest.raises(DatasetError, match="empty.png.*|0 bytes"):
        decode_image_file(empty)
    with pytest.raises(DatasetError, match="not found"):
        decode_image_file(tmp_path / "missing.png")


def test_missing_folder_and_empty_folder_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        folder_references(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no images"):
        folder_references(tmp_path)


def test_hub_by_name_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError, match="not reachable.*embedded.*hf_disk"):
        hf_hub_references("tanganke/stl10")


def test_hub_by_name_fails_fast_without_network(monkeypatch):
    # Here the machine has no route to the hub: the socket probe must fail within seconds.
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(DatasetError, match="not reachable"):
        hf_hub_references("tanganke/stl10")
    assert time.monotonic() - start < 15


def test_hf_disk_source_reads_a_saved_dataset(tmp_path):
    import datasets

    images = [Image.fromarray(np.full((48, 48, 3), v, np.uint8)) for v in (10, 200)]
    ds = datasets.Dataset.from_dict({"img": images, "label": [0, 1]}).cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    from iqa_ray.data.sources import hf_disk_references

    refs = hf_disk_references(tmp_path / "saved")
    assert len(refs) == 2
    assert load_reference(refs[1])[0, 0].tolist() == [200, 200, 200]


def test_to_rgb_rejects_bad_arrays():
    with pytest.raises(ValueError, match="uint8"):
        to_rgb_uint8(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((4, 4, 2), np.uint8))
