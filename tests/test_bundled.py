"""The human-rated photos that ship with the repository: 627 LIVE Challenge photos read by a short name."""

import pytest

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.catalog import load_table, resolve_spec
from iqa_ray.search.recipe import dataset_adapter


def test_the_bundled_livec_photos_load_by_their_short_name_with_their_copyright_notice():
    from iqa_ray.core.paths import bundled_datasets_dir

    root = bundled_datasets_dir() / "livec"
    assert resolve_spec("livec") == f"livec:{root}"
    assert "COPYRIGHT NOTICE STARTS" in (root / "LIVE_CHALLENGE_README.txt").read_text()  # kept, as the licence asks
    table = load_table("livec")
    assert len(table) == 627 and table["mos"].between(0, 100).all()
    assert set(table["split"]) == {"train", "val", "test"}
    assert table["group"].is_unique  # one photo per group: splits never share a photo
    assert dataset_adapter("livec") == "livec"  # recipes see the adapter (the paper recipe's per-dataset resize)
    assert resolve_spec("koniq10k:/data/k") == "koniq10k:/data/k"


def test_a_missing_bundled_folder_says_where_it_was_looked_for_and_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("IQA_RAY_BUNDLED", str(tmp_path))
    with pytest.raises(DatasetError, match=r"ships with the repository, in .*livec.*pass 'livec:<root>'"):
        load_table("livec")


def test_a_bare_csv_spec_is_refused_saying_what_the_generic_adapter_needs(tmp_path):
    """`csv:ROOT` cannot name the columns and score range: a clear error, not a TypeError."""
    (tmp_path / "labels.csv").write_text("image,mos\na.jpg,50\n")
    with pytest.raises(DatasetError, match=r"csv_file, image_col, mos_col, mos_range.*Layout"):
        load_table(f"csv:{tmp_path}")
