"""The user's own families and layouts, named in IQA_RAY_PLUGINS, are registered in every process
that imports iqa-ray (the launcher's driver and each Ray worker), with no code of theirs in iqa-ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass

    from torch import nn

    from iqa_ray.data.datasets.layout import Layout
    from iqa_ray.data.datasets.registry import register_layout
    from iqa_ray.models.base import IQAModel
    from iqa_ray.models.registry import register_family
    from iqa_ray.core.options import Options


    @dataclass(frozen=True)
    class TinyOptions(Options):
        width: int = 4


    class TinyIQA(IQAModel):
        def __init__(self, backbone, *, width=TinyOptions.width, loss=None):
            super().__init__(backbone, loss=loss)
            self.head = nn.Linear(backbone.channels[-1], 1)

        def forward_head(self, stages):
            return {"score": self.to_label_scale(self.head(stages[-1].mean(dim=(2, 3))).squeeze(1))}


    register_family("tiny", TinyIQA, TinyOptions)
    register_layout(Layout(name="plugdb", label_files=("scores.csv",), image_col="file", score_col="mos",
                           score_range=(1, 5)))
''')

CHECK = textwrap.dedent('''
    import json, sys
    from iqa_ray.training.config import TrainConfig, valid_keys
    from iqa_ray.data.catalog import load_table

    config = TrainConfig.from_dict({"family": "tiny", "width": 3, "pretrained": "none"})
    table = load_table("plugdb:" + sys.argv[1])
    print(json.dumps({"width": config.model.width, "mos": table.mos.tolist(), "key": "width" in valid_keys()}))
''')


def run(tmp_path, plugins, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "IQA_RAY_PLUGINS": plugins}
    return subprocess.run([sys.executable, "-c", CHECK, *args], env=env, capture_output=True, text=True, timeout=300)


def test_a_plugin_module_registers_a_family_and_a_layout_in_a_fresh_process(tmp_path):
    (tmp_path / "mylab_plugin.py").write_text(PLUGIN)
    root = tmp_path / "db"
    root.mkdir()
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(root / name)
    (root / "scores.csv").write_text("file,mos\na.png,1\nb.png,5\n")
    proc = run(tmp_path, " mylab_plugin, ", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"width": 3, "mos": [0.0, 100.0], "key": True}


def test_a_plugin_that_cannot_be_imported_is_named(tmp_path):
    proc = run(tmp_path, "no_such_plugin_module", str(tmp_path))
    assert proc.returncode != 0
    assert "IQA_RAY_PLUGINS names the module 'no_such_plugin_module', which cannot be imported" in proc.stderr


def test_ray_workers_get_the_plugins_variable(monkeypatch):
    import ray

    from iqa_ray.search import cluster as ray_init

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    monkeypatch.setenv("IQA_RAY_PLUGINS", "mylab_plugin")
    ray_init.init_ray(num_cpus=1)
    assert seen["runtime_env"]["env_vars"] == {"IQA_RAY_PLUGINS": "mylab_plugin"}
    assert seen["runtime_env"]["worker_process_setup_hook"] == ray_init.WORKER_SETUP_HOOK
    monkeypatch.delenv("IQA_RAY_PLUGINS")
    seen.clear()
    ray_init.init_ray(num_cpus=1)
    assert "env_vars" not in seen["runtime_env"]
