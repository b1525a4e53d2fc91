"""The baselines every search summary prints: PIQE, BRISQUE and the frozen-feature linear probe."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from iqa_ray.core.metrics import all_metrics, srcc
from iqa_ray.evaluation.baselines import (
    PROBE_ALPHAS,
    baseline_report,
    baseline_scores,
    pooled_stage_features,
    ridge_probe,
)
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.loaders import load_decoded

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split(n, rng):
    order = rng.permutation(n)
    return order[: n // 2], order[n // 2: 3 * n // 4], order[3 * n // 4:]


def test_the_probe_chooses_its_ridge_strength_on_validation_and_equals_sklearn():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 30))
    mos = features[:, :3] @ np.array([3.0, -2.0, 1.0]) + rng.normal(scale=2.0, size=200)
    train, val, test = _split(200, rng)
    result = ridge_probe(features, mos, train, val, test)
    assert result["alpha"] in PROBE_ALPHAS and result["n"] == len(test)
    x = (features - features[train].mean(0)) / (features[train].std(0) + 1e-8)
    val_srcc = {a: srcc(Ridge(alpha=a).fit(x[train], mos[train]).predict(x[val]), mos[val]) for a in PROBE_ALPHAS}
    assert result["val_srcc"] == pytest.approx(max(val_srcc.values()))
    expected = all_metrics(Ridge(alpha=result["alpha"]).fit(x[train], mos[train]).predict(x[test]), mos[test])
    assert result["srcc"] == pytest.approx(expected["srcc"]) and result["plcc"] == pytest.approx(expected["plcc"])
    assert result["srcc"] > 0.6  # the signal is there and the probe finds it


def test_the_test_labels_do_not_shape_the_probe():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(120, 20))
    mos = features[:, 0] * 2 + rng.normal(size=120)
    train, val, test = _split(120, rng)
    shuffled = mos.copy()
    shuffled[test] = rng.permutation(mos[test])
    a, b = ridge_probe(features, mos, train, val, test), ridge_probe(features, shuffled, train, val, test)
    assert a["alpha"] == b["alpha"] and a["val_srcc"] == b["val_srcc"]  # chosen without the test labels
    assert a["srcc"] != b["srcc"]  # and scored against them


def test_pooled_features_take_every_stage_of_whole_images_of_mixed_sizes():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8) for _ in range(3)]
    images.append(rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8))
    torch.manual_seed(0)  # random weights: the same ones for both calls
    features = pooled_stage_features(images, backbone="resnet18", pretrained="none")
    assert features.shape == (4, 64 + 64 + 128 + 256 + 512)  # resnet18's five stages
    torch.manual_seed(0)
    alone = pooled_stage_features(images[2:], backbone="resnet18", pretrained="none")
    np.testing.assert_allclose(features[2:], alone, rtol=1e-4, atol=1e-5)  # batching changes nothing


def test_baseline_report_scores_the_test_split_of_a_dataset(tiny_dataset):
    decoded = load_decoded(TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "crop_size": 48}))
    report = baseline_report(decoded, backbone="efficientnet_lite0", pretrained="offline")
    test = decoded.split_indices("test")
    assert set(report) == {"piqe", "brisque", "linear_probe"}
    assert all(r["n"] == len(test) for r in report.values())
    mos = decoded.table["mos"].to_numpy()[test]
    piqe = all_metrics(baseline_scores("piqe", [decoded.images[i] for i in test]), mos)
    assert report["piqe"]["srcc"] == pytest.approx(piqe["srcc"])
    assert np.isfinite(report["linear_probe"]["srcc"]) and report["linear_probe"]["backbone"] == "efficientnet_lite0"


def test_brisque_score_is_the_package_score_of_its_36_features():
    from skimage.data import astronaut

    from iqa_ray.evaluation.baselines import _brisque_model, brisque_features, brisque_score

    image = astronaut()[::2, ::2]
    features = brisque_features(image)
    assert features.shape == (36,) and np.isfinite(features).all()
    # the package's own path (grey image, features at full and half size, its SVR) gives the same score
    assert brisque_score(image) == pytest.approx(float(_brisque_model().score(image)), abs=1e-9)
    # half size is its own 18 statistics, not a copy of the first
    assert not np.allclose(features[:18], features[18:])


def _decoded_with_flat(n_textured, n_flat, seed=3):
    """A decoded dataset whose test split holds ``n_textured`` photos of varied texture and
    ``n_flat`` flat grey ones (BRISQUE gives a flat image no finite score)."""
    import pandas as pd

    from iqa_ray.data.decoded import DecodedImages

    rng = np.random.default_rng(seed)
    images, mos = [], []
    for k in range(n_textured):
        smooth = rng.normal(128, 40, size=(64, 64, 3)).clip(0, 255)
        noise = rng.normal(0, 4 + 8 * k, size=(64, 64, 3))
        images.append((smooth + noise).clip(0, 255).astype(np.uint8))
        mos.append(90.0 - 8 * k + rng.normal())
    images += [np.full((64, 64, 3), 128, np.uint8) for _ in range(n_flat)]
    mos += [50.0] * n_flat
    names = [f"photo{i}.jpg" for i in range(len(images))]
    table = pd.DataFrame({"image_id": names, "split": "test", "mos": mos})
    return DecodedImages(images=np.stack(images), table=table)


def test_brisque_scores_the_photos_it_can_and_names_the_flat_one():
    from iqa_ray.evaluation.baselines import FLAT, brisque_score, classical_baseline, scored_images

    decoded = _decoded_with_flat(6, 1)
    scores, reasons = scored_images("brisque", decoded.images)
    assert np.isnan(scores[-1]) and reasons[-1] == FLAT
    assert np.isfinite(scores[:-1]).all() and reasons[:-1] == [None] * 6
    assert scores[0] == pytest.approx(-brisque_score(decoded.images[0]))  # sign-flipped: higher is better
    record = classical_baseline(decoded, "brisque")
    mos = decoded.table["mos"].to_numpy()
    expected = all_metrics(scores[:-1], mos[:-1])  # over the six photos it scored
    assert record["srcc"] == pytest.approx(expected["srcc"]) and record["plcc"] == pytest.approx(expected["plcc"])
    assert record["n"] == 7 and record["scored"] == 6
    assert record["unscored"] == {"count": 1, "reasons": {FLAT: 1}, "images": [{"image": "photo6.jpg", "reason": FLAT}]}
    assert record["note"] == f"1 of 7 test photos gave BRISQUE no finite score: 1 x {FLAT}"
    # PIQE does score a flat image (as its worst, 100): nothing is left out of it
    piqe = classical_baseline(decoded, "piqe")
    assert piqe["scored"] == 7 and "unscored" not in piqe and np.isfinite(piqe["srcc"])


def test_a_baseline_that_scores_too_few_photos_has_no_correlation_and_says_why():
    from iqa_ray.evaluation.baselines import classical_baseline

    record = classical_baseline(_decoded_with_flat(2, 3), "brisque")
    assert record["scored"] == 2 and record["srcc"] is None and record["plcc"] is None
    assert record["undefined"] == "a correlation needs at least 3 scored photos, 2 were scored"
    assert record["unscored"]["count"] == 3


def test_the_summary_line_of_a_baseline_never_prints_nan():
    from iqa_ray.evaluation.baselines import classical_baseline
    from iqa_ray.search.summary import baseline_lines

    probe = {"n": 7, "backbone": "efficientnet_lite0", "pretrained": "offline", "alpha": 10.0, "srcc": 0.5, "plcc": 0.4}
    some = {"linear_probe": probe, "piqe": classical_baseline(_decoded_with_flat(6, 1), "piqe"),
            "brisque": classical_baseline(_decoded_with_flat(6, 1), "brisque")}
    text = "\n".join(baseline_lines({"baselines": some, "versus_probe": 0.1}))
    brisque = some["brisque"]
    assert (f"  BRISQUE: SRCC {brisque['srcc']:.4f}  PLCC {brisque['plcc']:.4f} on the other 6 photos; "
            "1 of 7 test photos gave BRISQUE no finite score: 1 x flat image (one colour throughout)") in text
    assert "nan" not in text.lower()
    few = {**some, "brisque": classical_baseline(_decoded_with_flat(2, 3), "brisque")}
    text = "\n".join(baseline_lines({"baselines": few, "versus_probe": float("nan")}))
    assert ("  BRISQUE: no SRCC or PLCC: a correlation needs at least 3 scored photos, 2 were scored; "
            "3 of 5 test photos gave BRISQUE no finite score: 3 x flat image (one colour throughout)") in text
    assert "cannot be compared with the probe" in text and "nan" not in text.lower()


_CLASSICAL_IN_A_FRESH_PROCESS = """
import json, sys
import numpy as np, pandas as pd
from iqa_ray.data.decoded import DecodedImages
from iqa_ray.search.tasks import score_classical

rng = np.random.default_rng(0)
images = rng.integers(0, 256, size=(6, 48, 48, 3), dtype=np.uint8)
table = pd.DataFrame({"image_id": [f"p{i}.jpg" for i in range(6)], "split": "test", "mos": np.arange(6.0)})
piqe, brisque = score_classical(DecodedImages(images=images, table=table), ("piqe", "brisque"))
heavy = ("ray.tune", "timm", "iqa_ray.search.summary", "iqa_ray.search.run", "iqa_ray.models.registry")
print(json.dumps({"n": [piqe["n"], brisque["n"]], "loaded": [m for m in heavy if m in sys.modules]}))
"""


def test_a_worker_scoring_piqe_and_brisque_imports_neither_the_search_layer_nor_the_models():
    """Ray runs a task by importing the module of its function: the classical baselines' task
    (iqa_ray/search/tasks.py) costs a worker PIQE's and BRISQUE's imports, not Ray Tune's, timm's
    and the search layer's (about 5 s of CPU per worker when it lived in search/summary.py)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CLASSICAL_IN_A_FRESH_PROCESS], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"n": [6, 6], "loaded": []}, result
