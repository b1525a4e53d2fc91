"""Bad rows all at once (issue 37): a real dataset's bad labels, missing files and unreadable images
are named together in one error, or skipped and listed, before the split is drawn."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.datasets.image_check import image_problem
from iqa_ray.data.datasets.registry import load_iqa_dataset

REASONS = ("mos value 'nan' is not a finite number", "image file not found", "image file is truncated")


@pytest.fixture
def tiny_livec(tmp_path):
    """12 generated 64x48 JPEGs with MOS in the LIVE Challenge layout (``livec.csv``, ``Images/``)."""
    root = tmp_path / "livec-tiny"
    (root / "Images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{100 + i}.jpg" for i in range(12)]
    for i, name in enumerate(names):
        smooth = rng.normal(128, 30, size=(48, 64, 3)) + rng.normal(0, 2 + 6 * i, size=(48, 64, 3))
        Image.fromarray(smooth.clip(0, 255).astype(np.uint8)).save(root / "Images" / name, quality=90)
    pd.DataFrame({"image": names, "mos": np.linspace(80, 20, 12)}).to_csv(root / "livec.csv", index=False)
    return root


def test_every_bad_row_and_unreadable_image_is_named_in_one_error(tiny_livec, spoil_livec):
    bad = spoil_livec(tiny_livec)
    with pytest.raises(DatasetError) as info:
        load_iqa_dataset("livec", tiny_livec, check_images=True)
    message = str(info.value)
    assert message.startswith("livec: 3 bad rows in ") and 'on_error="skip"' in message
    lines = [line for line in message.splitlines() if "livec.csv: data row" in line]
    assert len(lines) == 3  # every row in one error, in the order of the label file
    for row, line, name, reason in zip((4, 5, 6), lines, bad, REASONS):
        assert f"data row {row} (line {row + 1}), image {name!r}:" in line and reason in line, line


def test_without_the_image_check_only_the_label_rows_are_found_and_more_than_20_are_counted(tiny_livec, spoil_livec):
    spoil_livec(tiny_livec)
    with pytest.raises(DatasetError, match="2 bad rows") as info:
        load_iqa_dataset("livec", tiny_livec)
    assert "truncated.jpg" not in str(info.value)  # its header is fine: only the image check reads further
    table = pd.read_csv(tiny_livec / "livec.csv")
    table.loc[:, "mos"] = float("nan")
    extra = pd.DataFrame({"image": [f"gone{i}.jpg" for i in range(20)], "mos": 50.0})
    pd.concat([table, extra]).to_csv(tiny_livec / "livec.csv", index=False, na_rep="nan")
    with pytest.raises(DatasetError) as info:
        load_iqa_dataset("livec", tiny_livec, check_images=True)
    message = str(info.value)
    assert message.startswith("livec: 35 bad rows in ")
    assert message.count("livec.csv: data row") == 20 and message.endswith("... and 15 more")


def test_skipped_rows_are_in_no_split_and_the_others_split_as_if_they_were_never_there(tiny_livec, spoil_livec):
    clean = load_iqa_dataset("livec", tiny_livec, fractions=(0.5, 0.25, 0.25))
    bad = spoil_livec(tiny_livec)
    with pytest.warns(UserWarning, match="skipped 3 of 15 rows"):
        table = load_iqa_dataset("livec", tiny_livec, fractions=(0.5, 0.25, 0.25), on_error="skip", check_images=True)
    assert not set(bad) & set(table["image_id"])
    pd.testing.assert_frame_equal(table[["image_id", "split", "mos"]], clean[["image_id", "split", "mos"]])
    skipped = table.attrs["skipped"]
    assert [s["image"] for s in skipped] == bad and [s["row"] for s in skipped] == [4, 5, 6]
    assert all(reason in s["reason"] for s, reason in zip(skipped, REASONS))
    assert skipped[2]["path"] == str(tiny_livec / "Images" / "truncated.jpg")  # an image's entry names its file


def test_the_image_check_finds_empty_foreign_and_truncated_files_and_passes_whole_ones(tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    image.save(tmp_path / "whole.jpg")
    image.save(tmp_path / "whole.png")
    jpg, png = (tmp_path / "whole.jpg").read_bytes(), (tmp_path / "whole.png").read_bytes()
    (tmp_path / "trailer.jpg").write_bytes(jpg + b"SEFT camera trailer")  # bytes after the end marker decode fine
    (tmp_path / "cut.jpg").write_bytes(jpg[: len(jpg) * 2 // 3])
    (tmp_path / "cut.png").write_bytes(png[: len(png) * 2 // 3])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    assert [image_problem(str(tmp_path / n)) for n in ("whole.jpg", "whole.png", "trailer.jpg")] == [None] * 3
    assert "image file is truncated" in image_problem(str(tmp_path / "cut.jpg"))
    assert image_problem(str(tmp_path / "cut.png")).startswith("the image cannot be read")
    assert image_problem(str(tmp_path / "empty.jpg")) == "the image file is empty (0 bytes)"
    assert "cannot identify image file" in image_problem(str(tmp_path / "text.jpg"))
