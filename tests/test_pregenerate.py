import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.pregenerate import generate as pg_generate
from iqa_ray.data.pregenerate import store as pg_store
from iqa_ray.data.pregenerate.config import PregenConfig
from iqa_ray.data.pregenerate.plan import crop_grid, list_references
from iqa_ray.data.pregenerate.run import pregenerate
from iqa_ray.data.pregenerate.store import open_generated, read_shards


def test_dataset_folder_is_complete_and_self_describing(tiny_dataset, tiny_config):
    path = tiny_dataset.path
    assert path.name.startswith("embedded-medium-")
    assert (path / "manifest.json").exists() and (path / "processing_stats.json").exists()
    assert not list(path.parent.glob(".partial-*"))
    m, s = tiny_dataset.manifest, tiny_dataset.stats
    assert m["config"]["crop_size"] == 64 and m["config_hash"] in path.name
    assert all(r["licence"] and r["call"] and r["package"] for r in m["references"])
    table = read_shards(tiny_dataset).to_pandas()
    assert len(table) == s["processed"] == sum(sh["rows"] for sh in m["shards"])
    assert table["image_id"].is_unique
    n_crops = sum(r["crops"] for r in m["references"])
    assert len(table) == n_crops * (1 + tiny_config.per_image)
    assert s["failed"] == 0 and s["elapsed_s"] > 0 and s["images_per_s"] > 0
    assert sum(s["per_type"].values()) == len(table)
    assert set(table["distortion"]) <= set(tiny_config.distortions) | {"none"}


def test_images_decode_to_crops_and_labels_are_consistent(tiny_dataset):
    table = read_shards(tiny_dataset).to_pandas()
    row = table[table.distortion != "none"].iloc[0]
    img = np.asarray(Image.open(__import__("io").BytesIO(row["image"])))
    assert img.shape == (64, 64, 3)
    ref = table[(table.ref_id == row.ref_id) & (table.distortion == "none")].iloc[0]
    assert ref.mos_ssim == 100.0 and ref.level == 0.0
    from iqa_ray.data.labels import quality_label

    ref_img = np.asarray(Image.open(__import__("io").BytesIO(ref["image"])))
    assert row.mos_ssim == pytest.approx(quality_label(ref_img, img))
    assert 0 <= table.mos_ssim.min() and table.mos_ssim.max() <= 100
    assert (table.level[table.distortion != "none"].between(0.2, 0.6)).all()  # medium preset


def test_split_is_by_photo_and_recorded(tiny_dataset):
    table = read_shards(tiny_dataset).to_pandas()
    groups_per_split = table.groupby("split")["group"].apply(set)
    assert set(groups_per_split.index) == {"train", "val", "test"}
    assert not (groups_per_split["train"] & groups_per_split["val"])
    assert not (groups_per_split["train"] & groups_per_split["test"])
    assert not (groups_per_split["val"] & groups_per_split["test"])
    grey = {r["group"]: r["grey"] for r in tiny_dataset.manifest["references"]}
    for split, groups in groups_per_split.items():  # stratified: both kinds of photo everywhere
        assert {grey[g] for g in groups} == {True, False}, split
    recorded = tiny_dataset.manifest["splits"]["groups"]
    assert all(recorded[g] == s for s, gs in groups_per_split.items() for g in gs)


def test_severity_label_is_content_free_and_falls_with_level(tiny_dataset):
    table = read_shards(tiny_dataset).to_pandas()
    distorted = table[table.distortion != "none"]
    severity = tiny_dataset.manifest["severity_table"]
    for name, rows in distorted.groupby("distortion"):
        expected = np.interp(rows.level, severity[name]["levels"], severity[name]["mos"])
        assert np.allclose(rows.mos_severity, expected)
        assert np.all(np.diff(severity[name]["mos"]) <= 0)
    # saturation is calibrated on colour photos only (it is a no-op on grey ones)
    n_colour = sum(1 for r in tiny_dataset.manifest["references"] if not r["grey"])
    assert severity["saturation"]["n_photos"] <= n_colour


def _textured_photo(path, seed):
    """A 96x96 colour photo of smooth random texture (distortions change it measurably)."""
    coarse = np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((96, 96), Image.Resampling.BILINEAR).save(path)


def test_severity_table_is_calibrated_on_the_training_photos_only(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(6):
        _textured_photo(src / f"p{i}.png", seed=i)
    config = PregenConfig(source="folder", source_path=str(src), crop_size=64, max_short_side=96, per_image=1,
                          distortions=("gaussian_blur", "gaussian_noise", "jpeg"), severity_levels=3)

    def generate(out):
        # A repainted file keeps its ReferenceInfo (path, size), so the decode cache would hand back the old pixels.
        pg_generate._scaled_reference.cache_clear()
        return pregenerate(config, tmp_path / out, engine="local")

    first = generate("a")
    split = {r["key"]: r["split"] for r in first.manifest["references"]}
    train = sorted(k for k, s in split.items() if s == "train")
    held_out = sorted(k for k, s in split.items() if s != "train")
    assert train and held_out
    # Repaint every validation and test photo: the labels' table must not move.
    for k, name in enumerate(held_out):
        _textured_photo(src / name, seed=100 + k)
    second = generate("b")
    assert {r["key"]: r["split"] for r in second.manifest["references"]} == split
    assert second.manifest["severity_table"] == first.manifest["severity_table"]
    # Repainting one training photo does move it: the comparison above can see a change.
    _textured_photo(src / train[0], seed=200)
    third = generate("c")
    assert third.manifest["severity_table"] != first.manifest["severity_table"]
    # The manifest says what the table averages.
    assert first.manifest["calibrated_on"] == {"split": "train", "photos": train}
    assert all(entry["n_photos"] == len(train) for entry in first.manifest["severity_table"].values())


def test_a_change_of_labelling_recipe_is_a_new_dataset_not_a_reused_one(tiny_config, monkeypatch):
    refs, _ = list_references(tiny_config)
    before = pg_store.config_fingerprint(tiny_config, refs)
    monkeypatch.setattr(pg_store, "LABEL_VERSION", pg_store.LABEL_VERSION + 1)
    assert pg_store.config_fingerprint(tiny_config, refs) != before


def test_generation_is_deterministic(tiny_dataset, tiny_config, tmp_path):
    again = pregenerate(tiny_config, tmp_path, engine="local")
    assert again.path.name == tiny_dataset.path.name
    a = read_shards(tiny_dataset).to_pandas()
    b = read_shards(again).to_pandas()
    assert a.drop(columns=["image"]).equals(b.drop(columns=["image"]))
    assert (a["image"] == b["image"]).all()


def test_same_config_reuses_and_other_config_writes_new(tiny_dataset, tiny_config):
    root = tiny_dataset.path.parent
    reused = pregenerate(tiny_config, root, engine="local")
    assert reused.reused and reused.path == tiny_dataset.path
    other = pregenerate(replace(tiny_config, seed=1), root, engine="local")
    assert other.path != tiny_dataset.path and not other.reused
    assert tiny_dataset.path.exists()


def test_interrupted_run_resumes_without_duplicates(tiny_config, tmp_path, monkeypatch):
    real = pg_generate._generate_unit
    calls = {"n": 0}

    def dies_after_two(unit):
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real(unit)

    monkeypatch.setattr(pg_generate, "_generate_unit", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        pregenerate(tiny_config, tmp_path, engine="local")
    partial = next(tmp_path.glob(".partial-*"))
    assert len(list((partial / "shards").glob("*.parquet"))) == 2
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")], "nothing looks complete"

    monkeypatch.setattr(pg_generate, "_generate_unit", real)
    done = pregenerate(tiny_config, tmp_path, progress=print, engine="local")
    table = read_shards(done).to_pandas()
    assert table["image_id"].is_unique
    n_crops = sum(r["crops"] for r in done.manifest["references"])
    assert len(table) == n_crops * (1 + tiny_config.per_image)
    assert not list(tmp_path.glob(".partial-*"))
    assert not list(done.path.rglob("*.stats.json")) and not list(done.path.rglob("*.tmp"))


def test_corrupt_inputs_are_counted_and_listed_and_the_run_goes_on(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(src / f"p{i}.png")
    good = (src / "p0.png").read_bytes()
    (src / "truncated.png").write_bytes(good[: len(good) // 3])  # header fine, data cut
    (src / "garbage.jpg").write_bytes(b"\x00" * 50)
    (src / "tiny.png").write_bytes(b"")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(src / "small.png")
    config = PregenConfig(source="folder", source_path=str(src), crop_size=64, max_short_side=96, per_image=2,
                          distortions=("jpeg", "gaussian_blur"), severity_levels=3)
    ds = pregenerate(config, tmp_path / "out", engine="local")
    failures = {f["path"].rsplit("/", 1)[-1]: f["error"] for f in ds.stats["failures"]}
    assert set(failures) == {"truncated.png", "garbage.jpg", "tiny.png", "small.png"}
    assert "smaller than the crop size" in failures["small.png"]
    assert ds.stats["failed"] == 4
    table = read_shards(ds).to_pandas()
    assert set(table["photo"]) == {f"p{i}.png" for i in range(4)}
    assert len(table) == 4 * 3
    # The truncated photo is found before the split is drawn: it takes no split's place.
    assert set(table["split"]) == {"train", "val", "test"}
    assert "truncated.png" not in ds.manifest["splits"]["groups"]


def test_no_usable_image_is_an_error(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(src / "small.png")
    config = PregenConfig(source="folder", source_path=str(src), crop_size=64, max_short_side=96)
    with pytest.raises(DatasetError, match="smaller than the crop size"):
        pregenerate(config, tmp_path / "out", engine="local")


def test_sample_keeps_a_fraction_per_split(tiny_config, tmp_path):
    full = sum(r["crops"] for r in pregenerate(tiny_config, tmp_path, engine="local").manifest["references"])
    sampled = pregenerate(replace(tiny_config, sample=0.3), tmp_path, engine="local")
    n = sum(r["crops"] for r in sampled.manifest["references"])
    assert 3 <= n < full
    assert set(read_shards(sampled).to_pandas()["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strength": "extreme"}, "light, medium, heavy"),
        ({"per_image": 0}, "per_image"),
        ({"sample": 0}, "sample"),
        ({"source": "ftp"}, "embedded, folder"),
        ({"source": "folder"}, "source_path"),
        ({"distortions": ("blurr",)}, "gaussian_blur"),
        ({"crop_size": 256, "max_short_side": 128}, "max_short_side"),
    ],
)
def test_bad_config_names_the_problem(kwargs, match):
    with pytest.raises((ValueError, KeyError), match=match):
        PregenConfig(**kwargs)


def test_crop_grid_is_centred_non_overlapping_and_capped():
    boxes = crop_grid(350, 200, 100, max_crops=10)
    assert boxes == [(25, 0, 125, 100), (125, 0, 225, 100), (225, 0, 325, 100),
                     (25, 100, 125, 200), (125, 100, 225, 200), (225, 100, 325, 200)]
    capped = crop_grid(1000, 1000, 100, max_crops=4)
    assert len(capped) == 4 and capped[0] == (0, 0, 100, 100) and capped[-1] == (900, 900, 1000, 1000)
    assert crop_grid(90, 500, 100, 4) == []


def test_open_generated_rejects_unfinished_folder(tmp_path):
    with pytest.raises(DatasetError, match="no manifest.json"):
        open_generated(tmp_path)


@pytest.mark.slow
def test_ray_data_engine_matches_local_engine(tiny_config, tiny_dataset, tmp_path, shared_ray):
    on_ray = pregenerate(tiny_config, tmp_path, engine="ray", crops_per_unit=2)
    assert on_ray.stats["engine"] == "ray"
    a = read_shards(tiny_dataset).to_pandas()
    b = read_shards(on_ray).to_pandas()
    assert a.drop(columns=["image"]).equals(b.drop(columns=["image"]))
    assert (a["image"] == b["image"]).all()
    assert json.loads((on_ray.path / "manifest.json").read_text())["severity_table"] == tiny_dataset.manifest["severity_table"]


def test_two_processes_generating_the_same_dataset_do_not_tear_each_others_files(tiny_config, tmp_path):
    # Two launches (or two test workers) sharing the dataset cache used to race: one's clean-up of
    # torn files or its final rename pulled the partial folder from under the other
    # (FileNotFoundError renaming a shard). Now the second waits and reuses the first's folder.
    import threading

    results, errors, messages = [], [], []

    def run():
        try:
            results.append(pregenerate(tiny_config, tmp_path, engine="local", progress=messages.append))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results[0].path == results[1].path and (results[0].path / "manifest.json").exists()
    assert any("another process" in m for m in messages)
    assert not list(tmp_path.glob(".partial-*"))
    table = read_shards(results[1]).to_pandas()
    assert table["image_id"].is_unique
    assert len(table) == sum(r["crops"] for r in results[1].manifest["references"]) * (1 + tiny_config.per_image)
