"""Tests for the real-dataset adapters in ``iqa_ray.data.datasets``.

Every test builds a tiny copy of a dataset's original layout in ``tmp_path``: a few small
PNG/JPEG/BMP files written with PIL, label files with the real column names (and, for LIVE
Challenge, ``.mat`` files with the structure of the release: a cell array of names and a 1xN
MOS array).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.io import savemat

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.datasets.registry import ADAPTERS, load_iqa_dataset, resolve_dataset_name
from iqa_ray.data.datasets.table import BASE_COLUMNS, seeded_group_split


def _img(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (value, 255 - value, 60)).save(path)


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _no_shared_groups(df: pd.DataFrame) -> None:
    per_group = df.groupby("group")["split"].nunique()
    assert (per_group == 1).all(), per_group[per_group > 1]


# ------------------------------------------------------------------------------------- KonIQ

KONIQ_HEADER = '"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","MOS_zscore"'
KONIQ_ROWS = [
    ("10004473376.jpg", 3.0, 50.1, "training"),
    ("10007357496.jpg", 4.2, 80.5, "test"),
    ("10007903636.jpg", 1.0, 3.2, "training"),
    ("10009096245.jpg", 5.0, 88.0, "validation"),
    ("100117038.jpg", 2.5, 40.0, "training"),
    ("10012398043.jpg", 3.8, 70.0, "test"),
]


def _koniq(tmp_path: Path, *, sets: bool = True, image_dir: str = "1024x768", rows=KONIQ_ROWS) -> Path:
    root = tmp_path / "koniq10k"
    lines = [KONIQ_HEADER]
    set_lines = ["image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,set"]
    for i, (name, mos, z, split) in enumerate(rows):
        _img(root / image_dir / name, 20 * i)
        lines.append(f'"{name}",1,2,50,40,7,100,{mos},0.52,{z}')
        set_lines.append(f"{name},0.01,0.02,0.5,0.4,0.07,100,{z},0.52,{split}")
    _write(root / "koniq10k_scores_and_distributions.csv", lines)
    if sets:
        _write(root / "koniq10k_distributions_sets.csv", set_lines)
    return root


def test_koniq_official_split_and_normalisation(tmp_path):
    root = _koniq(tmp_path)
    df = load_iqa_dataset("koniq10k", root)
    assert list(df.columns[:6]) == list(BASE_COLUMNS)
    assert len(df) == 6
    assert df["image_id"].tolist() == [r[0] for r in KONIQ_ROWS]
    assert df["mos_raw"].tolist() == [3.0, 4.2, 1.0, 5.0, 2.5, 3.8]
    assert df["mos"].tolist() == pytest.approx([50.0, 80.0, 0.0, 100.0, 37.5, 70.0])
    assert df["split"].tolist() == ["train", "test", "train", "val", "train", "test"]
    assert df["group"].tolist() == df["image_id"].tolist()
    assert df["path"].iloc[0] == str((root / "1024x768" / "10004473376.jpg").resolve())
    assert df["sd"].iloc[0] == pytest.approx(0.52)
    assert df["mos_zscore"].iloc[1] == pytest.approx(80.5)
    assert df["c_total"].iloc[0] == 100
    assert df.attrs["dataset"] == "koniq10k"
    assert df.attrs["split_source"] == "official"
    assert df.attrs["mos_scale"] == "KonIQ-10k MOS 1-5 -> (MOS-1)/4*100"
    assert df.attrs["skipped"] == []
    assert df.attrs["root"] == str(root.resolve())


def test_koniq_zscore_column_and_seeded_split_without_sets_file(tmp_path):
    root = _koniq(tmp_path, sets=False)
    df = load_iqa_dataset("koniq", root, mos_column="MOS_zscore", split_seed=3)
    assert df["mos"].tolist() == pytest.approx([50.1, 80.5, 3.2, 88.0, 40.0, 70.0])
    assert df.attrs["split_source"] == "seeded-random(seed=3, fractions=(0.7, 0.1, 0.2))"
    assert set(df["split"]) == {"train", "val", "test"}
    again = load_iqa_dataset("koniq-10k", root, mos_column="MOS_zscore", split_seed=3)
    assert again["split"].tolist() == df["split"].tolist()


def test_koniq_sets_file_only_uses_its_0_100_mos(tmp_path):
    root = _koniq(tmp_path)
    (root / "koniq10k_scores_and_distributions.csv").unlink()
    df = load_iqa_dataset("koniq10k", root)
    assert df["mos"].tolist() == pytest.approx([50.1, 80.5, 3.2, 88.0, 40.0, 70.0])
    assert df["split"].tolist() == ["train", "test", "train", "val", "train", "test"]
    assert "sets-file" in df.attrs["mos_scale"]


def test_koniq_512_folder_is_found_and_image_dir_override(tmp_path):
    root = _koniq(tmp_path, image_dir="512x384")
    df = load_iqa_dataset("koniq10k", root)
    assert Path(df["path"].iloc[0]).parent.name == "512x384"
    (root / "512x384").rename(root / "small")
    df = load_iqa_dataset("koniq10k", root, image_dir="small")
    assert Path(df["path"].iloc[0]).parent.name == "small"


def test_koniq_image_missing_from_official_split_file(tmp_path):
    root = _koniq(tmp_path)
    sets = root / "koniq10k_distributions_sets.csv"
    lines = sets.read_text().splitlines()
    sets.write_text("\n".join(lines[:-1]) + "\n")  # drop 10012398043.jpg from the split file
    with pytest.raises(DatasetError, match=r"data row 6 \(line 7\), image '10012398043.jpg'.*official split"):
        load_iqa_dataset("koniq10k", root)


def test_koniq_out_of_range_mos_names_the_value(tmp_path):
    rows = list(KONIQ_ROWS)
    rows[2] = ("10007903636.jpg", 55.0, 3.2, "training")  # a 0-100 value in the 1-5 column
    root = _koniq(tmp_path, rows=rows)
    with pytest.raises(DatasetError) as info:
        load_iqa_dataset("koniq10k", root)
    msg = str(info.value)
    assert "koniq10k_scores_and_distributions.csv" in msg and "data row 3" in msg
    assert "10007903636.jpg" in msg and "'55.0'" in msg and "[1, 5]" in msg


# ------------------------------------------------------------------------------------- KADID


def _kadid(tmp_path: Path, n_refs: int = 5) -> Path:
    root = tmp_path / "kadid10k"
    lines = ["dist_img,ref_img,dmos,var"]
    for r in range(1, n_refs + 1):
        _img(root / "images" / f"I{r:02d}.png", 10 * r)
        for kind, level in ((1, 1), (10, 3), (25, 5)):
            name = f"I{r:02d}_{kind:02d}_{level:02d}.png"
            _img(root / "images" / name, 10 * r + kind)
            dmos = 1 + (r % 5) * 0.5 + (0.25 if kind == 10 else 0.0)
            lines.append(f"{name},I{r:02d}.png,{dmos},0.4")
    _write(root / "dmos.csv", lines)
    return root


def test_kadid_rows_extras_and_grouped_split(tmp_path):
    root = _kadid(tmp_path)
    df = load_iqa_dataset("kadid10k", root, split_seed=1)
    assert len(df) == 15
    first = df.iloc[0]
    assert first["image_id"] == "I01_01_01.png"
    assert first["mos_raw"] == pytest.approx(1.5)
    assert first["mos"] == pytest.approx(12.5)
    row = df.set_index("image_id").loc["I01_10_03.png"]
    assert row["mos"] == pytest.approx(18.75)  # dmos 1.75 -> 0.75/4*100
    assert row["distortion"] == 10 and row["distortion_name"] == "jpeg" and row["level"] == 3
    assert row["ref_img"] == "I01.png" and row["group"] == "I01.png"
    assert row["ref_path"] == str((root / "images" / "I01.png").resolve())
    assert df.set_index("image_id").loc["I02_25_05.png", "distortion_name"] == "contrast change"
    assert df["var"].tolist() == pytest.approx([0.4] * 15)
    _no_shared_groups(df)
    assert set(df["split"]) == {"train", "val", "test"}
    assert df.groupby("split")["group"].nunique().to_dict() == {"train": 3, "val": 1, "test": 1}
    assert df.attrs["mos_scale"].startswith("KADID-10k dmos 1-5")


def test_kadid_seeded_split_is_deterministic(tmp_path):
    root = _kadid(tmp_path, n_refs=10)
    a = load_iqa_dataset("kadid", root, split_seed=7)
    b = load_iqa_dataset("kadid-10k", root, split_seed=7)
    assert a["split"].tolist() == b["split"].tolist()
    splits_by_seed = {
        tuple(load_iqa_dataset("kadid", root, split_seed=s)["split"]) for s in range(6)
    }
    assert len(splits_by_seed) > 1  # the seed matters
    for s in range(6):
        _no_shared_groups(load_iqa_dataset("kadid", root, split_seed=s))


def test_kadid_bad_file_name_pattern(tmp_path):
    root = _kadid(tmp_path, n_refs=3)
    with open(root / "dmos.csv", "a") as fh:
        fh.write("weird.png,I01.png,3.0,0.1\n")
    _img(root / "images" / "weird.png")
    with pytest.raises(DatasetError, match=r"dmos.csv: data row 10 \(line 11\), image 'weird.png'.*I<ref>_<type>_<level>"):
        load_iqa_dataset("kadid10k", root)


# -------------------------------------------------------------------------------------- SPAQ

SPAQ_HEADER = "Image name,MOS,Brightness,Colorfulness,Contrast,Noisiness,Sharpness"


def _spaq(tmp_path: Path, *, csv_export: bool = True) -> Path:
    root = tmp_path / "SPAQ"
    lines = [SPAQ_HEADER]
    for i, mos in enumerate([48.86, 62.5, 77.25, 0.0, 100.0], start=1):
        name = f"{i:05d}.jpg"
        _img(root / "TestImage" / name, 40 * i)
        lines.append(f"{name},{mos},47.43,55.57,55.71,37.86,42.57")
    if csv_export:
        _write(root / "Annotations" / "MOS and Image attribute scores.csv", lines)
    return root


def test_spaq_csv_export(tmp_path):
    root = _spaq(tmp_path)
    df = load_iqa_dataset("spaq", root)
    assert df["image_id"].tolist() == ["00001.jpg", "00002.jpg", "00003.jpg", "00004.jpg", "00005.jpg"]
    assert df["mos"].tolist() == pytest.approx([48.86, 62.5, 77.25, 0.0, 100.0])
    assert df["mos_raw"].tolist() == df["mos"].tolist()
    assert df["sharpness"].iloc[0] == pytest.approx(42.57)
    assert df.attrs["mos_scale"] == "SPAQ MOS 0-100 used as is"
    assert set(df["split"]) == {"train", "val", "test"}


def test_spaq_xlsx_without_openpyxl_explains_the_fix(tmp_path, monkeypatch):
    root = _spaq(tmp_path, csv_export=False)
    (root / "Annotations").mkdir()
    (root / "Annotations" / "MOS and Image attribute scores.xlsx").write_bytes(b"PK\x03\x04not really")

    def no_openpyxl(*args, **kwargs):
        raise ImportError("Missing optional dependency 'openpyxl'.")

    monkeypatch.setattr(pd, "read_excel", no_openpyxl)
    with pytest.raises(DatasetError) as info:
        load_iqa_dataset("spaq", root)
    msg = str(info.value)
    assert "pip install openpyxl" in msg
    assert "MOS and Image attribute scores.csv" in msg and "'Image name'" in msg and "'MOS'" in msg


def test_spaq_xlsx_read_with_pandas(tmp_path, monkeypatch):
    root = _spaq(tmp_path, csv_export=False)
    (root / "Annotations").mkdir()
    xlsx = root / "Annotations" / "MOS and Image attribute scores.xlsx"
    xlsx.write_bytes(b"placeholder")
    sheet = pd.DataFrame({"Image name": ["00001.jpg", "00002.jpg", "00003.jpg"], "MOS": [10.0, float("nan"), 30.5]})
    monkeypatch.setattr(pd, "read_excel", lambda path, *a, **k: sheet.copy())
    with pytest.raises(DatasetError, match=r"data row 2 \(sheet row 3\), image '00002.jpg': MOS value is empty"):
        load_iqa_dataset("spaq", root)
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        df = load_iqa_dataset("spaq", root, on_error="skip")
    assert df["mos"].tolist() == pytest.approx([10.0, 30.5])
    assert df.attrs["label_file"] == str(xlsx.resolve())


# ------------------------------------------------------------------------------------- LIVEC

LIVEC_NAMES = [f"t{i}.bmp" for i in range(1, 8)] + ["100.bmp", "101.bmp", "10.JPG", "1000.JPG"]
LIVEC_MOS = [63.96, 25.34, 48.94, 35.89, 66.51, 54.58, 77.88, 32.56, 66.36, 82.91, 3.5]


def _livec(tmp_path: Path, names=LIVEC_NAMES, mos=LIVEC_MOS) -> Path:
    root = tmp_path / "ChallengeDB_release"
    for i, name in enumerate(names):
        folder = root / "Images" / "trainingImages" if name.startswith("t") else root / "Images"
        _img(folder / name, 20 * i)  # .bmp and .JPG, as in the release
    cell = np.empty((len(names), 1), dtype=object)
    for i, name in enumerate(names):
        cell[i, 0] = name
    (root / "Data").mkdir(parents=True)
    savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cell})
    savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.asarray([mos], dtype=float)})
    savemat(root / "Data" / "AllStdDev_release.mat", {"AllStdDev_release": np.full((1, len(names)), 18.5)})
    return root


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_livec_mat_drops_the_7_training_images(tmp_path):
    root = _livec(tmp_path)
    df = load_iqa_dataset("livec", tmp_path)  # the ChallengeDB_release folder is entered
    assert df["image_id"].tolist() == ["100.bmp", "101.bmp", "10.JPG", "1000.JPG"]
    assert df["mos"].tolist() == pytest.approx([32.56, 66.36, 82.91, 3.5])
    assert df["mos_std"].tolist() == pytest.approx([18.5] * 4)
    assert df["path"].iloc[0] == str((root / "Images" / "100.bmp").resolve())
    assert df.attrs["dropped_training_images"] == [f"t{i}.bmp" for i in range(1, 8)]
    assert df.attrs["mos_scale"] == "LIVE Challenge MOS 0-100 used as is"


def test_livec_mat_keep_training_images(tmp_path):
    root = _livec(tmp_path)
    df = load_iqa_dataset("clive", root, drop_training_images=False)
    assert len(df) == 11
    assert df["path"].iloc[0] == str((root / "Images" / "trainingImages" / "t1.bmp").resolve())
    assert df["mos"].iloc[6] == pytest.approx(77.88)


def test_livec_bad_mos_entry_names_mat_file_and_entry(tmp_path):
    mos = list(LIVEC_MOS)
    mos[8] = float("nan")
    root = _livec(tmp_path, mos=mos)
    with pytest.raises(DatasetError) as info:
        load_iqa_dataset("live_challenge", root)
    msg = str(info.value)
    assert "AllMOS_release.mat: entry 9" in msg and "'101.bmp'" in msg
    assert "AllMOS_release value nan is not a finite number" in msg


def test_livec_length_mismatch_is_structural(tmp_path):
    root = _livec(tmp_path)
    savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.asarray([LIVEC_MOS[:-1]])})
    with pytest.raises(DatasetError, match="lists 11 images but .*AllMOS_release.mat has 10 scores"):
        load_iqa_dataset("livec", root, on_error="skip")


def test_livec_converted_csv(tmp_path):
    root = tmp_path / "livec"
    lines = ["image,mos"]
    for i, name in enumerate(["t1.bmp", "t2.bmp", "5.bmp", "6.bmp", "7.bmp"]):
        _img(root / "Images" / ("trainingImages" if name.startswith("t") else "") / name, 30 * i)
        lines.append(f"{name},{10 * (i + 1)}")
    _write(root / "livec.csv", lines)
    df = load_iqa_dataset("livec", root)
    assert df["image_id"].tolist() == ["5.bmp", "6.bmp", "7.bmp"]
    assert df["mos"].tolist() == pytest.approx([30.0, 40.0, 50.0])
    assert df.attrs["dropped_training_images"] == ["t1.bmp", "t2.bmp"]


# ------------------------------------------------------------------------------------- AGIQA

AGIQA_HEADER = "name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,std_align"


def _agiqa(tmp_path: Path) -> Path:
    root = tmp_path / "AGIQA-3K-root"
    lines = [AGIQA_HEADER]
    prompts = ["statue of a man", "a tray of sushi", '"a cat, anime style"', "man lost in space", "a cosmic universe"]
    for p, prompt in enumerate(prompts):
        for g, generator in enumerate(["AttnGAN_normal", "sd1.5_lowstep", "midjourney_normal"]):
            name = f"{generator}_{p:03d}.jpg"
            Image.new("RGB", (8, 8), (p * 40, g * 80, 0)).save(_mkparent(root / "AGIQA-3K" / name), format="JPEG")
            style = "anime style" if "anime" in prompt else ""
            lines.append(f"{name},{prompt},,,{style},{0.5 * (g + 1) + 0.1 * p},0.4,2.5,0.6")
    _write(root / "data.csv", lines)
    return root


def test_agiqa_prompt_groups_and_normalisation(tmp_path):
    root = _agiqa(tmp_path)
    df = load_iqa_dataset("agiqa3k", root, split_seed=0)
    assert len(df) == 15
    row = df.set_index("image_id").loc["sd1.5_lowstep_002.jpg"]
    assert row["mos_raw"] == pytest.approx(1.2)
    assert row["mos"] == pytest.approx(24.0)
    assert row["prompt"] == "a cat, anime style" and row["group"] == "a cat, anime style"
    assert row["style"] == "anime style" and row["generator"] == "sd1.5"
    assert row["mos_align"] == pytest.approx(2.5)
    assert df["group"].nunique() == 5
    _no_shared_groups(df)
    assert set(df["split"]) == {"train", "val", "test"}
    assert df.attrs["mos_scale"] == "AGIQA-3K mos_quality 0-5 -> mos_quality*20"
    b = load_iqa_dataset("agiqa-3k", root, split_seed=0)
    assert b["split"].tolist() == df["split"].tolist()


def test_agiqa_images_folder_named_images(tmp_path):
    root = _agiqa(tmp_path)
    (root / "AGIQA-3K").rename(root / "images")
    df = load_iqa_dataset("agiqa3k", root)
    assert Path(df["path"].iloc[0]).parent.name == "images"


# ----------------------------------------------------------------------------------- generic


def _generic(tmp_path: Path) -> Path:
    root = tmp_path / "mine"
    lines = ["file;score;scene;fold"]
    for i, (score, scene, fold) in enumerate(
        [(0, "a", "training"), (10, "a", "training"), (5, "b", "Test"), (2.5, "c", "valid"), (7.5, "d", "train")]
    ):
        _img(root / "pics" / "sub" / f"{i}.png", 30 * i)
        lines.append(f"sub/{i}.png;{score};{scene};{fold}")
    _write(root / "labels.csv", lines)
    return root


def test_generic_csv_lower_is_better_with_groups_and_split_column(tmp_path):
    root = _generic(tmp_path)
    kwargs = dict(csv_file="labels.csv", image_col="file", mos_col="score", mos_range=(0, 10), image_dir="pics")
    df = load_iqa_dataset("csv", root, higher_is_better=False, group_col="scene", split_col="fold", **kwargs)
    assert df["image_id"].tolist() == [f"sub/{i}.png" for i in range(5)]
    assert df["mos"].tolist() == pytest.approx([100.0, 0.0, 50.0, 75.0, 25.0])
    assert df["split"].tolist() == ["train", "train", "test", "val", "train"]
    assert df["group"].tolist() == ["a", "a", "b", "c", "d"]
    assert df.attrs["split_source"] == "official"
    assert "(hi-x)/(hi-lo)*100" in df.attrs["mos_scale"]
    seeded = load_iqa_dataset("csv", root, group_col="scene", split_seed=4, **kwargs)
    assert seeded["mos"].tolist() == pytest.approx([0.0, 100.0, 50.0, 25.0, 75.0])
    assert seeded.attrs["split_source"].startswith("seeded-random(seed=4")
    _no_shared_groups(seeded)
    assert "fold" in seeded.columns  # unused columns are kept


def test_generic_csv_bad_split_value(tmp_path):
    root = _generic(tmp_path)
    text = (root / "labels.csv").read_text().replace("d;train", "d;holdout")
    (root / "labels.csv").write_text(text)
    with pytest.raises(DatasetError, match=r"labels.csv: data row 5 \(line 6\), image 'sub/4.png'.*'holdout'.*valid values"):
        load_iqa_dataset(
            "csv", root, csv_file="labels.csv", image_col="file", mos_col="score",
            mos_range=(0, 10), image_dir="pics", split_col="fold",
        )


# ------------------------------------------------------------------------------------ errors


def test_missing_root_names_the_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_iqa_dataset("kadid10k", tmp_path / "nowhere")


def test_missing_label_file_says_which_file_where(tmp_path):
    root = _kadid(tmp_path, n_refs=3)
    (root / "dmos.csv").unlink()
    with pytest.raises(DatasetError) as info:
        load_iqa_dataset("kadid10k", root)
    assert str(root.resolve() / "dmos.csv") in str(info.value)
    with pytest.raises(DatasetError, match="koniq10k_scores_and_distributions.csv"):
        load_iqa_dataset("koniq10k", tmp_path)
    with pytest.raises(DatasetError, match="AllImages_release.mat.*livec.csv"):
        load_iqa_dataset("livec", tmp_path)
    with pytest.raises(DatasetError, match="MOS and Image attribute scores"):
        load_iqa_dataset("spaq", tmp_path)


def test_missing_image_folder_is_structural(tmp_path):
    root = _kadid(tmp_path, n_refs=3)
    (root / "images").rename(root / "imgs")
    with pytest.raises(DatasetError, match="no image folder found"):
        load_iqa_dataset("kadid10k", root, on_error="skip")
    df = load_iqa_dataset("kadid10k", root, image_dir="imgs")
    assert len(df) == 9


def test_missing_columns_lists_expected_and_found(tmp_path):
    root = _kadid(tmp_path, n_refs=3)
    text = (root / "dmos.csv").read_text().replace("dist_img,ref_img,dmos,var", "dist_img,ref_img,mos,var")
    (root / "dmos.csv").write_text(text)
    with pytest.raises(DatasetError) as info:
        load_iqa_dataset("kadid10k", root, on_error="skip")
    msg = str(info.value)
    assert "dmos.csv" in msg and "['dmos']" in msg
    assert "expected columns ['dist_img', 'ref_img', 'dmos']" in msg
    assert "found ['dist_img', 'ref_img', 'mos', 'var']" in msg


@pytest.mark.parametrize(
    ("bad", "expected"),
    [("", "dmos value is empty"), ("abc", "dmos value 'abc' is not a number"), ("nan", "'nan' is not a finite number")],
)
def test_bad_mos_value_names_file_row_image_and_value(tmp_path, bad, expected):
    root = _kadid(tmp_path, n_refs=3)
    lines = (root / "dmos.csv").read_text().splitlines()
    lines[4] = f"I02_01_01.png,I02.png,{bad},0.4"
    (root / "dmos.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as info:
        load_iqa_dataset("kadid10k", root)
    msg = str(info.value)
    assert "dmos.csv: data row 4 (line 5), image 'I02_01_01.png'" in msg
    assert expected in msg and "[1, 5]" in msg


def test_duplicate_image_names_both_rows(tmp_path):
    root = _kadid(tmp_path, n_refs=3)
    with open(root / "dmos.csv", "a") as fh:
        fh.write("I01_10_03.png,I01.png,2.0,0.4\n")
    with pytest.raises(DatasetError) as info:
        load_iqa_dataset("kadid10k", root)
    msg = str(info.value)
    assert "data row 10 (line 11), image 'I01_10_03.png'" in msg
    assert "also listed at" in msg and "data row 2 (line 3)" in msg


def test_missing_image_file(tmp_path):
    root = _kadid(tmp_path, n_refs=3)
    (root / "images" / "I03_25_05.png").unlink()
    with pytest.raises(DatasetError) as info:
        load_iqa_dataset("kadid10k", root)
    msg = str(info.value)
    assert "dmos.csv: data row 9 (line 10), image 'I03_25_05.png'" in msg
    assert "image file not found" in msg and str(root.resolve() / "images" / "I03_25_05.png") in msg
    df = load_iqa_dataset("kadid10k", root, check_files=False)
    assert len(df) == 9


def test_empty_dataset(tmp_path):
    root = _kadid(tmp_path, n_refs=3)
    _write(root / "dmos.csv", ["dist_img,ref_img,dmos,var"])
    with pytest.raises(DatasetError, match="dmos.csv has no data rows"):
        load_iqa_dataset("kadid10k", root)
    (root / "dmos.csv").write_text("")
    with pytest.raises(DatasetError, match="dmos.csv: the file is empty"):
        load_iqa_dataset("kadid10k", root)


def test_on_error_skip_counts_and_lists(tmp_path):
    root = _kadid(tmp_path, n_refs=3)
    lines = (root / "dmos.csv").read_text().splitlines()
    lines[2] = "I01_10_03.png,I01.png,x,0.4"
    lines.append("I01_01_01.png,I01.png,2.0,0.4")  # duplicate
    (root / "dmos.csv").write_text("\n".join(lines) + "\n")
    (root / "images" / "I03_25_05.png").unlink()
    with pytest.warns(UserWarning, match="skipped 3 of 10 rows"):
        df = load_iqa_dataset("kadid10k", root, on_error="skip")
    assert len(df) == 7
    skipped = df.attrs["skipped"]
    assert [(s["row"], s["image"]) for s in skipped] == [
        (2, "I01_10_03.png"),
        (9, "I03_25_05.png"),
        (10, "I01_01_01.png"),
    ]
    assert "not a number" in skipped[0]["reason"]
    assert "image file not found" in skipped[1]["reason"]
    assert "duplicated" in skipped[2]["reason"]
    assert skipped[0]["file"].endswith("dmos.csv") and skipped[0]["line"] == 3
    kept = df.set_index("image_id")
    assert kept.loc["I01_01_01.png", "mos_raw"] == pytest.approx(1.5)  # first of the duplicates kept


def test_on_error_skip_everything_is_still_an_error(tmp_path):
    root = _kadid(tmp_path, n_refs=3)
    with pytest.raises(DatasetError, match="all 9 rows .* were skipped"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_iqa_dataset("kadid10k", root, on_error="skip", image_dir=root)  # no images there


def test_invalid_on_error_and_fractions(tmp_path):
    root = _kadid(tmp_path, n_refs=3)
    with pytest.raises(ValueError, match=r"on_error must be one of \['raise', 'skip'\], got 'ignore'"):
        load_iqa_dataset("kadid10k", root, on_error="ignore")
    with pytest.raises(ValueError, match="sum to 1"):
        load_iqa_dataset("kadid10k", root, fractions=(0.5, 0.1, 0.1))


# ------------------------------------------------------------------------- names and splits


def test_aliases_and_unknown_name():
    assert resolve_dataset_name("KonIQ") == "koniq10k"
    assert resolve_dataset_name("koniq-10k") == "koniq10k"
    assert resolve_dataset_name("kadid") == "kadid10k"
    assert resolve_dataset_name("kadid-10k") == "kadid10k"
    assert resolve_dataset_name("live_challenge") == "livec"
    assert resolve_dataset_name("clive") == "livec"
    assert resolve_dataset_name("agiqa-3k") == "agiqa3k"
    assert set(ADAPTERS) == {"koniq10k", "kadid10k", "spaq", "livec", "agiqa3k", "csv"}
    with pytest.raises(ValueError) as info:
        load_iqa_dataset("tid2013", "/nonexistent")
    msg = str(info.value)
    assert "'tid2013'" in msg
    for name in ADAPTERS:
        assert f"'{name}'" in msg


def test_seeded_group_split_properties():
    groups = [f"g{i // 3}" for i in range(60)]  # 20 groups of 3
    a = seeded_group_split(groups, seed=5)
    assert a == seeded_group_split(groups, seed=5)
    assert a != seeded_group_split(groups, seed=6)
    by_group: dict[str, set[str]] = {}
    for g, s in zip(groups, a):
        by_group.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in by_group.values())
    assert [a.count(s) for s in ("train", "val", "test")] == [42, 6, 12]  # 14, 2, 4 groups
    assert sorted(seeded_group_split(["x", "y", "z"], seed=0)) == ["test", "train", "val"]
    # the assignment depends on the set of groups, not on the order of the rows
    shuffled = list(reversed(groups))
    assert list(reversed(seeded_group_split(shuffled, seed=5))) == a
    with pytest.raises(ValueError, match=r"\(train, val, test\)"):
        seeded_group_split(groups, fractions=(0.5, 0.5))
