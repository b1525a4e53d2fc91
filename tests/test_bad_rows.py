"""Bad rows all at once (issue 37): a real dataset's bad labels, missing files and unreadable images
are named together in one error, or skipped and listed, before the split is drawn; a search does it
before Ray starts, or skips them with --skip-bad-rows and records them.

The end-to-end run with the option (the search proceeds; summary.json and experiment.json list the
three rows) is test_recipe.py's cpu-recipe search on a LIVE Challenge copy.
"""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from iqa_ray.cli.tune import build_parser, main
from iqa_ray.core.errors import DatasetError
from iqa_ray.data.datasets.image_check import image_problem
from iqa_ray.data.datasets.registry import load_iqa_dataset
from iqa_ray.search.settings import changed_flags, settings_from_args

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


def parse(*argv):
    return build_parser("ranking").parse_args(list(argv))


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


def test_every_bad_row_and_unreadable_image_is_named_in_one_error_before_ray_starts(tiny_livec, spoil_livec,
                                                                                    capsys):
    import ray

    bad = spoil_livec(tiny_livec)
    assert main(["--dataset", f"livec:{tiny_livec}", "--gpus", "0"], study="ranking") == 2
    err = capsys.readouterr().err
    assert not ray.is_initialized()  # refused by the pre-flight
    assert "livec: 3 bad rows in" in err and "--skip-bad-rows" in err
    lines = [line for line in err.splitlines() if "livec.csv: data row" in line]
    assert len(lines) == 3  # one error, every row in it, in the order of the label file
    for row, line, name, reason in zip((4, 5, 6), lines, bad, REASONS):
        assert f"data row {row} (line {row + 1}), image {name!r}:" in line and reason in line, line


def test_skip_bad_rows_runs_on_without_them_and_records_each_one(tiny_livec, spoil_livec, tmp_path, capsys):
    from iqa_ray.search.retrain import split_columns
    from iqa_ray.search.run import prepare_dataset, write_experiment_info
    from iqa_ray.training.config import TrainConfig
    from iqa_ray.training.loaders import load_decoded

    bad = spoil_livec(tiny_livec)
    argv = ["--dataset", f"livec:{tiny_livec}", "--gpus", "0", "--skip-bad-rows", "--storage", str(tmp_path),
            "--name", "skip"]
    with pytest.warns(UserWarning, match="skipped 3"):
        settings = settings_from_args(parse(*argv), "ranking")
    with pytest.warns(UserWarning, match="skipped 3"):
        decoded, _, skipped = prepare_dataset(settings, smoke=False)
    config = TrainConfig.from_dict(settings.effective_study.constants())
    assert config.data.skip_bad_rows  # in every trial's config, so whatever re-reads its data skips the same rows
    assert [s["image"] for s in skipped] == bad and all(r in s["reason"] for s, r in zip(skipped, REASONS))
    assert len(decoded.table) == 12 and not set(bad) & set(decoded.table["image_id"])
    out = capsys.readouterr().out
    assert (f"[data] livec:{tiny_livec}: 3 bad rows skipped (--skip-bad-rows), in no split: "
            "row 4 (image 'bad_mos.jpg'): ") in out
    # experiment.json records the option and every row it skipped
    settings = replace(settings, skipped_rows=tuple(skipped))
    (tmp_path / "skip").mkdir()
    write_experiment_info(settings, parse(*argv))
    record = json.loads((tmp_path / "skip" / "experiment.json").read_text())
    assert record["launch"]["skip_bad_rows"] is True and record["overrides"]["skip_bad_rows"] is True
    assert [s["image"] for s in record["skipped_rows"]] == bad
    assert [s["row"] for s in record["skipped_rows"]] == [4, 5, 6]
    assert record["skipped_rows"][1]["file"].endswith("livec.csv")
    # --splits and the notebooks read the table as the search did (the same rows left out); a config
    # without skip_bad_rows stops at them
    with pytest.warns(UserWarning, match="skipped 3"):
        assert len(split_columns(config, decoded.table, [1])[1]) == 12
    with pytest.warns(UserWarning, match="skipped 3"):
        assert list(load_decoded(config).table["image_id"]) == list(decoded.table["image_id"])
    strict = TrainConfig.from_dict({**settings.effective_study.constants(), "skip_bad_rows": False})
    with pytest.raises(DatasetError, match="2 bad rows"):  # (without the image check: the labels' two)
        split_columns(strict, decoded.table, [1])
    # a resume may not start skipping rows the experiment kept
    kept = {**record, "overrides": {k: v for k, v in record["overrides"].items() if k != "skip_bad_rows"}}
    assert "--skip-bad-rows (given now, not recorded)" in changed_flags(parse(*argv), kept, settings.study,
                                                                        current=settings.study)
    assert not changed_flags(parse(*argv), record, settings.study, current=settings.study)


def test_the_launcher_documents_the_option():
    assert "--skip-bad-rows" in build_parser("ranking").format_help()
