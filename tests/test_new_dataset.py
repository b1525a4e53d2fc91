"""A dataset whose labels are one table beside its images is data: a Layout, registered.

The layout below is declared in this test file only, the way a user adds a dataset. Nothing else
is edited, yet ``mydb:ROOT`` is a dataset spec: the table has the common columns and scores on
0-100 (flipped, since lower is better here), splits keep whole groups apart, bad rows are named,
and a training config decodes it.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from iqa_ray.core.errors import DatasetError
from iqa_ray.data.catalog import load_table
from iqa_ray.data.datasets.layout import Layout
from iqa_ray.data.datasets.registry import ADAPTERS, load_iqa_dataset, register_layout, unregister_layout
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.loaders import load_decoded

# ----------------------------------------------------------------------------- the new dataset (3 lines)
MYDB = Layout(name="mydb", label_files=("labels/scores.csv",), image_dirs=("photos",), image_col="file",
              score_col="dmos", score_range=(0, 10), higher_is_better=False, group_col="scene",
              number_columns=("std",), text_columns=("device",))
# -----------------------------------------------------------------------------


@pytest.fixture
def mydb(tmp_path):
    register_layout(MYDB, aliases=("my-db",))
    root = tmp_path / "mydb"
    (root / "photos").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    lines = ["file,dmos,scene,std,device"]
    for i in range(30):
        name = f"p{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "photos" / name)
        lines.append(f"{name},{i % 10 + 0.5},s{i // 3},{0.1 * i:.1f},{'phone' if i % 2 else 'dslr'}")
    (root / "labels" / "scores.csv").write_text("\n".join(lines) + "\n")
    yield root
    unregister_layout("mydb")
    assert "mydb" not in ADAPTERS


def test_a_layout_declared_in_a_test_file_is_a_dataset_spec(mydb):
    table = load_table(f"mydb:{mydb}")
    assert len(table) == 30 and table.attrs["dataset"] == "mydb"
    assert list(table.columns[:6]) == ["image_id", "path", "mos", "mos_raw", "split", "group"]
    assert {"std", "device"} <= set(table.columns)
    first = table.set_index("image_id").loc["p00.png"]
    assert first.mos_raw == 0.5 and first.mos == pytest.approx(95.0)  # (10 - 0.5) / 10 * 100: lower was better
    assert first.device == "dslr" and first["std"] == 0.0
    # whole scenes go to one split
    assert table.groupby("group").split.nunique().max() == 1 and set(table.split) == {"train", "val", "test"}
    # the alias, and a seeded split that another seed changes
    again = load_iqa_dataset("my-db", mydb, split_seed=1)
    assert (again.image_id == table.image_id).all() and not (again.split == table.split).all()


def test_a_training_config_decodes_it(mydb):
    config = TrainConfig.from_dict({"dataset": f"mydb:{mydb}", "crop_size": 32})
    decoded = load_decoded(config)
    assert len(decoded.images) == 30 and decoded.images[0].shape == (40, 48, 3)


def test_its_bad_rows_are_named_like_any_adapters(mydb):
    path = mydb / "labels" / "scores.csv"
    path.write_text(path.read_text().replace("p03.png,3.5", "p03.png,12"))
    with pytest.raises(DatasetError, match=r"scores.csv: data row 4 \(line 5\), image 'p03.png': dmos value '12' is outside the raw "
                                           r"range; expected a number in \[0, 10\]"):
        load_table(f"mydb:{mydb}")
    with pytest.raises(ValueError, match=r"dataset names \['mydb'\] are already registered"):
        register_layout(MYDB)
    with pytest.raises(ValueError, match="score_range must be two finite numbers with lowest < highest"):
        Layout(name="bad", label_files=("x.csv",), image_col="f", score_col="s", score_range=(5, 1))
