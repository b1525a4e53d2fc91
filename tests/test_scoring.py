"""Using the model a search found: ``iqa_ray.load_model`` and ``iqa-ray score`` give the scores the
engine's own evaluation gives, on files, PIL images, arrays and tensors; unreadable files are
reported without stopping; the ``iqa-ray`` command dispatches its subcommands."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import iqa_ray
from iqa_ray.cli import main as iqa_ray_main
from iqa_ray.evaluation.scoring import ScoreError, image_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def trained(one_epoch_model):
    return one_epoch_model


def test_a_loaded_model_scores_files_exactly_as_the_engine_evaluated_them(trained):
    model = iqa_ray.load_model(trained["run"], device="cpu")
    assert "mlp" in repr(model) and "3 patches of 48 px" in repr(model)
    np.testing.assert_array_equal(model(trained["paths"]), trained["expected"])
    # In other batches the matrix products group differently: the same scores up to float32 rounding (a few ulp).
    result = model.score_files(trained["paths"], batch_size=4)
    assert result.paths == trained["paths"] and not result.failed
    np.testing.assert_allclose(result.scores, trained["expected"], rtol=1e-6, atol=0)


def test_pil_images_arrays_and_tensors_score_like_their_files(trained):
    model = iqa_ray.load_model(trained["checkpoint"], device="cpu")
    arrays = trained["arrays"][:5]
    # The files of the same five images, in one batch of five: identical scores are expected only
    # for the same batch (matrix products group differently in another batch size: a few ulp,
    # which the engine's scores of all the images are checked against below).
    expected = model(trained["paths"][:5])
    np.testing.assert_allclose(expected, trained["expected"][:5], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(model([Image.fromarray(a) for a in arrays]), expected)
    np.testing.assert_array_equal(model(arrays), expected)
    uint8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    np.testing.assert_array_equal(model(uint8), expected)
    np.testing.assert_allclose(model(uint8.float() / 255), expected, rtol=0, atol=1e-9)
    assert model(arrays[0]).shape == (1,)


def test_bad_inputs_and_bad_models_are_clear_errors(trained, tmp_path):
    model = iqa_ray.load_model(trained["checkpoint"], device="cpu")
    with pytest.raises(ScoreError, match="uint8 \\(H, W, 3\\)"):
        model(np.zeros((64, 64), dtype=np.float32))
    with pytest.raises(ScoreError, match="smaller than the model's 48 px patches"):
        model(np.zeros((20, 20, 3), dtype=np.uint8))
    with pytest.raises(ScoreError, match="cannot decode image"):
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"not a jpeg")
        model([str(bad)])
    with pytest.raises(ScoreError, match="no such file or folder"):
        iqa_ray.load_model(tmp_path / "nothing")
    with pytest.raises(ScoreError, match="neither an experiment folder nor a run folder"):
        iqa_ray.load_model(tmp_path)


def test_a_trial_folder_means_its_newest_checkpoint(trained, tmp_path):
    trial = tmp_path / "trial_abc"
    (trial / "checkpoint_000000").mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps({"lr": 1e-3}))
    shutil.copy(trained["checkpoint"], trial / "checkpoint_000000" / "checkpoint.pt")
    model = iqa_ray.load_model(trial, device="cpu")
    assert "trial trial_abc" in repr(model)
    np.testing.assert_array_equal(model(trained["paths"]), trained["expected"])


def test_iqa_ray_score_writes_csv_and_reports_unreadable_files_without_stopping(trained, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(trained["folder"], folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (folder / "notes.txt").write_text("not an image")  # not an image suffix: not looked at
    out = tmp_path / "scores.csv"
    code = iqa_ray_main(["score", str(trained["run"]), str(folder), str(tmp_path / "missing.png"),
                         "--out", str(out), "--device", "cpu", "--batch-size", "5", "--quiet"])
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["image"] for r in rows] == [str(folder / f"img_{i:03d}.png") for i in range(len(trained["paths"]))]
    np.testing.assert_allclose([float(r["score"]) for r in rows], trained["expected"], rtol=1e-6, atol=0)
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.jpg" in err and "missing.png" in err
    assert f"{len(rows)} scored to {out}, 2 skipped" in err


def test_iqa_ray_score_exits_2_on_a_bad_model_and_1_when_nothing_scores(trained, tmp_path, capsys):
    assert iqa_ray_main(["score", str(tmp_path / "nope"), str(trained["folder"])]) == 2
    assert "error: no such file or folder" in capsys.readouterr().err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"garbage")
    assert iqa_ray_main(["score", str(trained["run"]), str(only_bad), "--quiet", "--device", "cpu"]) == 1
    assert not (tmp_path / "scores.csv").exists()


def test_image_files_expands_folders_in_order(trained, tmp_path):
    files, missing = image_files([trained["folder"], tmp_path / "gone.jpg"])
    assert files == sorted(trained["paths"]) and missing[0]["image"].endswith("gone.jpg")


def test_the_iqa_ray_command_lists_and_dispatches_subcommands(capsys):
    assert iqa_ray_main(["--help"]) == 0
    listing = capsys.readouterr().out
    for name in ("tune", "train", "pregenerate", "pretrain", "evaluate", "score", "export", "tensorboard"):
        assert f"  {name} " in listing
    assert iqa_ray_main(["frobnicate"]) == 2
    assert "unknown subcommand 'frobnicate'; valid: tune, train" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        iqa_ray_main(["tune", "--help"])
    assert exit_info.value.code == 0
    assert "usage: iqa-ray tune" in capsys.readouterr().out
