"""A model exported by ``iqa-ray export-model`` runs without iqa-ray and scores as the model does:
TorchScript (loaded in a process where iqa_ray cannot be imported) and ONNX (onnxruntime), with the
run's patch grid and resize rule inside."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import iqa_ray
from iqa_ray.cli import main as iqa_ray_main
from iqa_ray.data.decoded import grid_positions, short_side_size
from iqa_ray.evaluation.portable import _grid, export_onnx, export_torchscript, load_metadata
from iqa_ray.evaluation.scoring import IQAScorer, ScoreError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def trained(one_epoch_model):
    return one_epoch_model


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def with_data(scorer: IQAScorer, **data) -> IQAScorer:
    config = dataclasses.replace(scorer.config, data=dataclasses.replace(scorer.config.data, **data))
    return IQAScorer(scorer.model, config, scorer.device, scorer.source)


def test_the_grid_inside_the_export_is_the_datasets_grid():
    for h, w, c, n in [(64, 64, 48, 3), (384, 512, 224, 25), (500, 500, 224, 25), (100, 70, 32, 5), (90, 90, 90, 1),
                       (333, 211, 50, 7), (1024, 768, 224, 10)]:
        assert _grid(h, w, c, n) == grid_positions(h, w, c, n), (h, w, c, n)


def test_torchscript_scores_like_the_model_without_importing_iqa_ray(trained, tmp_path):
    scorer = iqa_ray.load_model(trained["checkpoint"], device="cpu")
    path = export_torchscript(scorer, tmp_path / "model.pt")
    expected = scorer(list(trained["images"]))
    np.save(tmp_path / "images.npy", trained["images"])
    # A fresh interpreter in which importing iqa_ray fails: the file must carry everything.
    code = ("import sys, json, numpy as np, torch; sys.modules['iqa_ray'] = None; "
            f"m = torch.jit.load({str(path)!r}); x = torch.from_numpy(np.load({str(tmp_path / 'images.npy')!r}))"
            ".permute(0, 3, 1, 2).contiguous(); torch.set_num_threads(1); "
            "print(json.dumps(m(x).tolist()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    scores = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=0)
    meta = load_metadata(path)
    assert meta["family"] == "mlp" and meta["eval_patches"] == 3 and meta["crop_size"] == 48
    assert meta["patch_placement"] == "grid" and "0-100" in meta["output"]


def test_the_resize_rule_is_inside_the_export(trained, tmp_path):
    """image_size and short_side resize in the graph (antialiased bicubic, rounded to 8 bits) as PIL
    does at decode: pixels differ by a fraction of a grey level on average, scores by far less than they vary."""
    scorer = iqa_ray.load_model(trained["checkpoint"], device="cpu")
    images = trained["images"]
    h, w = images.shape[1:3]
    for data, size in [({"image_size": (56, 52)}, (52, 56)), ({"short_side": 50}, short_side_size(w, h, 50)[::-1])]:
        resized = with_data(scorer, **data)
        module = torch.jit.load(export_torchscript(resized, tmp_path / "resized.pt"))
        assert tuple(module.target_size(h, w)) == tuple(size)
        exported = module(as_tensor(images)).numpy()
        native = resized(list(images))
        spread = np.ptp(native) if np.ptp(native) > 0 else 1.0
        assert np.max(np.abs(exported - native)) < 0.05 * spread + 1e-3, (data, exported, native)


def test_onnx_scores_like_torchscript(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    scorer = iqa_ray.load_model(trained["checkpoint"], device="cpu")
    images = trained["images"]
    h, w = images.shape[1:3]
    path = export_onnx(scorer, tmp_path / "model.onnx", height=h, width=w)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (images[:1], images):  # any batch size
        (scores,) = session.run(None, {"images": as_tensor(batch).numpy()})
        np.testing.assert_allclose(scores, scorer(list(batch)), rtol=1e-4, atol=0)
    meta = json.loads(session.get_modelmeta().custom_metadata_map["iqa_ray"])
    assert meta["backbone"] == scorer.config.model.backbone and f"{h}, {w}" in meta["input"]


def test_random_placement_does_not_export_silently(trained, tmp_path):
    scorer = with_data(iqa_ray.load_model(trained["checkpoint"], device="cpu"), patch_placement="random")
    with pytest.raises(ScoreError, match="only grid placement exports"):
        export_torchscript(scorer, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


def test_iqa_ray_export_model_writes_both_files(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out, onnx_out = tmp_path / "m" / "model.pt", tmp_path / "m" / "model.onnx"
    h, w = trained["images"].shape[1:3]
    code = iqa_ray_main(["export-model", str(trained["checkpoint"]), "--out", str(out), "--onnx", str(onnx_out),
                         "--onnx-size", str(w), str(h)])
    assert code == 0 and out.exists() and onnx_out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.pt"]  # no temporary left
    assert "TorchScript written to" in capsys.readouterr().err
    assert iqa_ray_main(["export-model", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
