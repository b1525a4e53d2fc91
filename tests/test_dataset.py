import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.catalog import generated_table, load_table
from iqa_ray.data.decoded import IQADataset, decode_table, grid_positions


def png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def decoded(tiny_dataset):
    return decode_table(generated_table(tiny_dataset.path))


def test_decoded_once_into_one_block_and_labels_follow_the_chosen_column(tiny_dataset, decoded):
    assert "image" not in decoded.table.columns
    assert all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for im in decoded.images)
    assert decoded.images[0].base is decoded.images[-1].base  # one contiguous block
    ssim_table = generated_table(tiny_dataset.path, label="ssim")
    assert np.array_equal(ssim_table["mos"], ssim_table["mos_ssim"])
    assert np.array_equal(decoded.table["mos"], decoded.table["mos_severity"])
    with pytest.raises(ValueError, match="severity, ssim"):
        generated_table(tiny_dataset.path, label="psnr")


def test_training_items_are_random_crops_and_flips(decoded):
    ds = IQADataset(decoded, "train", train=True, crop_size=48)
    torch.manual_seed(0)
    a = [ds[0]["image"] for _ in range(6)]
    assert a[0].shape == (3, 48, 48) and a[0].dtype == torch.uint8
    assert any(not torch.equal(a[0], x) for x in a[1:])
    torch.manual_seed(0)
    assert all(torch.equal(x, ds[0]["image"]) for x in a[:1])  # seeded -> reproducible


def test_evaluation_crops_are_deterministic(decoded):
    centre = IQADataset(decoded, "test", train=False, crop_size=48)
    item = centre[1]
    assert item["image"].shape == (1, 3, 48, 48)
    row = item["index"]
    expected = torch.from_numpy(decoded.images[row][8:56, 8:56]).permute(2, 0, 1)
    assert torch.equal(item["image"][0], expected)
    grid = IQADataset(decoded, "test", train=False, crop_size=48, eval_patches=4)
    first, second = grid[1]["image"], grid[1]["image"]
    assert first.shape == (4, 3, 48, 48) and torch.equal(first, second)
    assert float(grid[1]["mos"]) == pytest.approx(decoded.table["mos"][row])


def test_grid_positions_cover_the_image():
    assert grid_positions(100, 100, 50, 1) == [(25, 25)]
    assert grid_positions(100, 120, 50, 4) == [(0, 0), (0, 70), (50, 0), (50, 70)]
    assert len(grid_positions(200, 200, 50, 5)) == 5


def test_splits_never_share_a_photo(decoded):
    t = decoded.table
    groups = {s: set(t.group[t.split == s]) for s in ("train", "val", "test")}
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["val"])


def _table(rows):
    return pd.DataFrame(rows)


def test_corrupt_truncated_empty_and_missing_images_name_the_image(tmp_path):
    good = png(np.full((40, 40, 3), 99, np.uint8))
    (tmp_path / "zero.png").write_bytes(b"")
    cases = {
        "truncated": {"image": good[:60]},
        "garbage": {"image": b"GIF89a not really"},
        "zero": {"path": str(tmp_path / "zero.png")},
        "missing": {"path": str(tmp_path / "missing.png")},
    }
    for name, source in cases.items():
        table = _table([{"image_id": "ok", "split": "train", "mos": 50.0, "image": good, "path": None},
                        {"image_id": name, "split": "train", "mos": 40.0, "image": None, "path": None, **source}])
        with pytest.raises(DatasetError, match=name):
            decode_table(table)
        kept = decode_table(table, on_error="skip")
        assert list(kept.table.image_id) == ["ok"] and kept.skipped[0]["image_id"] == name


def test_small_images_empty_tables_and_bad_columns_are_rejected():
    small = _table([{"image_id": "s", "split": "train", "mos": 1.0, "image": png(np.zeros((20, 30, 3), np.uint8))}])
    with pytest.raises(DatasetError, match="30x20, smaller than the crop size 64"):
        decode_table(small, min_size=64)
    with pytest.raises(DatasetError, match="empty"):
        decode_table(small.iloc[0:0])
    with pytest.raises(DatasetError, match="missing"):
        decode_table(small.drop(columns=["mos"]))
    with pytest.raises(ValueError, match="on_error"):
        decode_table(small, on_error="ignore")


def test_crop_larger_than_images_and_empty_split_are_errors(decoded):
    with pytest.raises(DatasetError, match="crop_size 96"):
        IQADataset(decoded, "train", train=True, crop_size=96)
    with pytest.raises(DatasetError, match="split 'holdout' is empty"):
        IQADataset(decoded, "holdout", train=True, crop_size=32)


def test_load_table_resolves_generated_folders_and_rejects_unknown_specs(tiny_dataset, tmp_path):
    assert len(load_table(str(tiny_dataset.path))) == tiny_dataset.stats["processed"]
    with pytest.raises(DatasetError, match="embedded"):
        load_table("no-such-dataset")
    with pytest.raises(DatasetError, match="no manifest.json"):
        load_table(str(tmp_path))


def test_an_exact_image_size_decodes_into_one_block_equal_to_decoding_each_image(tiny_dataset):
    table = generated_table(tiny_dataset.path)
    decoded = decode_table(table, image_size=(40, 30))
    assert isinstance(decoded.images, np.ndarray) and decoded.images.flags.c_contiguous
    assert decoded.images.shape == (len(table), 30, 40, 3)
    each = np.stack([decode_table(table.iloc[[i]], image_size=(40, 30)).images[0] for i in range(3)])
    np.testing.assert_array_equal(decoded.images[:3], each)
    bad = table.copy()
    bad.at[1, "image"] = b"not an image"
    kept = decode_table(bad, image_size=(40, 30), on_error="skip")
    assert len(kept.images) == len(table) - 1 and kept.skipped[0]["row"] == 1
    np.testing.assert_array_equal(kept.images[1], decoded.images[2])
