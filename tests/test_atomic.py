"""Disk writes are atomic: a crash mid-write leaves the old file (or the new one), never a torn one."""

import json

import pandas as pd
import pytest
import torch

from iqa_ray.core.io import atomic_path, atomic_write_json, save_checkpoint
from iqa_ray.training.checkpoints import load_checkpoint


class Crash(Exception):
    pass


def test_crash_inside_an_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write_json(target, {"version": 1})
    with pytest.raises(Crash):
        with atomic_path(target) as tmp:
            tmp.write_text('{"version": 2, "trunc')  # half of the new content, then the crash
            raise Crash()
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    atomic_write_json(target, {"version": 2})
    assert json.loads(target.read_text()) == {"version": 2}


def test_checkpoint_write_that_dies_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    good = {"format": "iqa-ray", "model": {"w": torch.ones(3)}}
    save_checkpoint(path, good)
    real_save = torch.save

    def dies_midway(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        with open(f, "r+b") as fh:
            fh.truncate(40)  # a torn file on disk...
        raise Crash()  # ...and the process dies before the rename

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(Crash):
        save_checkpoint(path, {"format": "iqa-ray", "model": {"w": torch.zeros(3)}})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_export_that_dies_midway_keeps_the_previous_parquet(tmp_path, monkeypatch):
    from iqa_ray.search import export

    exp = tmp_path / "exp"
    (exp / "trial_a").mkdir(parents=True)
    (exp / "trial_a" / "params.json").write_text(json.dumps({"lr": 0.1, "epochs": 1}))
    (exp / "trial_a" / "result.json").write_text(json.dumps({"trial_id": "a", "epoch": 1, "val_srcc": 0.5}) + "\n")
    export.export_experiment(exp)
    before = pd.read_parquet(exp / "trials.parquet")
    real = pd.DataFrame.to_parquet

    def torn(self, path, *a, **kw):
        with open(path, "wb") as fh:
            fh.write(b"PAR1 torn")
        raise Crash()

    monkeypatch.setattr(pd.DataFrame, "to_parquet", torn)
    (exp / "trial_a" / "result.json").write_text(json.dumps({"trial_id": "a", "epoch": 1, "val_srcc": 0.9}) + "\n")
    with pytest.raises(Crash):
        export.export_experiment(exp)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    assert pd.read_parquet(exp / "trials.parquet").equals(before)
    assert not list(exp.glob(".*.tmp"))
