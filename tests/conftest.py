"""Shared fixtures. Everything heavy is session-scoped and small enough for 2 CPU cores."""

from __future__ import annotations

import os

import pytest

# Keep torch/numpy from oversubscribing the 2 CI cores when tests run beside Ray workers. Under
# pytest-xdist (`make test` runs two workers) each worker is one of two processes sharing the
# cores, and OpenMP threads spin-wait when their core is taken, so each worker computes on one
# thread. Ray trials set their own thread count from their CPU share either way.
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")

E2E_GROUP = "e2e"
MAX_AUTO_WORKERS = 8


def pytest_xdist_auto_num_workers(config):
    """How many workers ``-n auto`` starts (plain ``pytest`` passes it, see pyproject.toml): one per
    CPU this process may run on, at most ``MAX_AUTO_WORKERS``. Each worker imports torch and builds
    the session fixtures again, so more workers than that cost memory and no longer save time."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, MAX_AUTO_WORKERS))


def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n N --dist loadgroup`` the end-to-end tests run one at a time, on one worker.

    Each of them starts its own Ray instance (or `ray start` cluster) sized to the whole machine,
    trains, and has timeouts set for an otherwise idle machine; two at once would each see every
    CPU and share them. The fast tests run beside them on the other workers, and so do the slow
    tests marked ``in_process`` (they train in the pytest process on one thread, start no Ray and
    no subprocess, so they take the other core as the fast tests do). Without xdist the marker
    does nothing.

    The group is the suffix ``@e2e`` of each such test's node id, which xdist's scheduler groups
    by. pytest-xdist 3.8 writes that suffix into ``item._nodeid``, which pytest 9 no longer reads (a
    node id is ``item._id``), so its ``xdist_group`` marker does nothing here and the end-to-end
    tests were spread over both workers, two at a time; the suffix is set here instead
    (tests/test_conftest_guard.py checks that they share one worker).

    The other tests of a module form a group of their own (the suffix ``@<module>``), as
    ``--dist loadscope`` would make them: spread test by test, a module-scoped fixture (a training
    run several tests read) was built again on each worker that ran one of its tests.
    """
    in_groups = bool(config.getvalue("loadgroup")) if hasattr(config.option, "loadgroup") else False
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("in_process") is None:
            group = E2E_GROUP
        else:
            group = item.path.stem  # a module's other tests on one worker: its module fixtures built once
        item.add_marker(pytest.mark.xdist_group(group))
        if in_groups and not item.nodeid.endswith(f"@{group}"):
            _suffix_node_id(item, f"@{group}")


def _suffix_node_id(item, suffix: str) -> None:
    """Append ``suffix`` to the node id pytest reports and xdist schedules ``item`` by."""
    if hasattr(item, "_id"):  # pytest >= 9
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(item.nodeid + suffix)
    else:
        item._nodeid = item.nodeid + suffix


@pytest.fixture(autouse=True)
def in_process_starts_no_ray(request, monkeypatch):
    """A test marked ``in_process`` that starts Ray or a subprocess fails at that call, naming the
    marker: it runs beside the end-to-end tests under xdist, and a Ray instance or a child process
    sized to the machine would share their cores and break their timings. ``git`` is let through:
    a run records its code's revision (:func:`iqa_ray.core.io.git_revision`) in milliseconds."""
    if request.node.get_closest_marker("in_process") is None:
        return
    import subprocess

    import ray

    def refused(what):
        return AssertionError(f"{request.node.nodeid} is marked in_process but {what}; remove the marker so it "
                              "runs in the serial end-to-end group (tests/conftest.py)")

    def no_ray(*args, **kwargs):
        raise refused("starts Ray (ray.init)")

    popen_init = subprocess.Popen.__init__

    def git_only(self, args, *rest, **kwargs):
        argv = os.fsdecode(args).split() if isinstance(args, (str, bytes)) else [os.fsdecode(a) for a in args]
        if not argv or os.path.basename(argv[0]) != "git":
            raise refused(f"starts a subprocess ({args!r})")
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(subprocess.Popen, "__init__", git_only)


def _shared_ray() -> None:
    import ray

    from iqa_ray.search.cluster import init_ray

    if not ray.is_initialized():
        init_ray(log_to_driver=False)  # as a search's own start-up does without --verbose


@pytest.fixture
def shared_ray():
    """A Ray instance sized to the machine, shared by the end-to-end tests that run a search in this
    process: a search leaves a Ray instance it did not start running (iqa_ray.search.run), so each
    of them is spared Ray's start-up and shutdown and finds idle workers to reuse. Started on first
    use (again if a test shut it down); Ray shuts it down when the process exits."""
    _shared_ray()
    yield


@pytest.fixture(scope="session")
def shared_ray_session():
    """:func:`shared_ray` for session fixtures (the searches the notebook tests share)."""
    _shared_ray()
    yield


def _one_torch_thread():
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture
def one_torch_thread():
    """Torch computes on one thread for the test (deterministic, and fair to the other xdist worker)."""
    yield from _one_torch_thread()


@pytest.fixture(scope="module")
def one_torch_thread_module():
    """:func:`one_torch_thread` for module fixtures (a training run that several tests read)."""
    yield from _one_torch_thread()


TINY_TYPES = ("gaussian_blur", "jpeg", "gaussian_noise", "saturation", "contrast")


@pytest.fixture(scope="session")
def tiny_config():
    """A generation config that exercises every code path in about a second."""
    from iqa_ray.data.pregenerate.config import PregenConfig

    return PregenConfig(
        crop_size=64, max_short_side=128, max_crops_per_photo=2, per_image=3, distortions=TINY_TYPES,
        severity_levels=3, seed=0,
    )


@pytest.fixture(scope="session")
def tiny_dataset(tiny_config, tmp_path_factory):
    """The tiny config generated once, with the local engine."""
    from iqa_ray.data.pregenerate.run import pregenerate

    return pregenerate(tiny_config, tmp_path_factory.mktemp("generated"), engine="local")


@pytest.fixture(scope="session")
def one_epoch_model(tiny_dataset, tmp_path_factory):
    """A one-epoch MLP scoring 3 grid patches of 48 px (test_scoring, test_portable): its run folder
    and checkpoint, the test images as arrays and as lossless PNG files, and the engine's own
    predictions on them."""
    import numpy as np
    import torch
    from PIL import Image

    from iqa_ray.training.config import TrainConfig
    from iqa_ray.training.engine import fit
    from iqa_ray.training.inference import predict
    from iqa_ray.training.loaders import eval_dataset, eval_loader, load_decoded

    config = TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "crop_size": 48, "batch_size": 8,
                                    "eval_batch_size": 16, "eval_patches": 3, "epochs": 1, "lr": 3e-3,
                                    "family": "mlp", "hidden_dim": 16, "pretrained": "offline"})
    decoded = load_decoded(config)
    root = tmp_path_factory.mktemp("one-epoch")
    saved = []
    result = fit(config, decoded, on_epoch_end=lambda e: saved.append(e.save(root / "run")), score_test=False)
    test_rows = decoded.split_indices("test")
    folder = root / "photos"
    folder.mkdir()
    paths = []
    for i, row in enumerate(test_rows):
        path = folder / f"img_{i:03d}.png"  # lossless: decoding gives back the very pixels
        Image.fromarray(decoded.images[row]).save(path)
        paths.append(str(path))
    expected, _ = predict(result.model, eval_loader(config, eval_dataset(config, decoded, "test")), torch.device("cpu"))
    arrays = [decoded.images[r] for r in test_rows]
    return {"run": root / "run", "checkpoint": saved[-1], "paths": paths, "folder": folder, "expected": expected,
            "arrays": arrays, "images": np.stack(arrays[:6]), "root": root}


BAD_ROWS = ("bad_mos.jpg", "missing.jpg", "truncated.jpg")  # what spoil_livec adds, in row order


@pytest.fixture
def spoil_livec():
    """A function that adds three bad rows to a LIVE Challenge copy (``livec.csv`` and ``Images/``)
    after its third row: a NaN MOS, an image file that is not there and a truncated JPEG (the first
    half of the copy's first photo). Returns their image names, in that order (``BAD_ROWS``)."""
    import pandas as pd

    def spoil(root):
        table = pd.read_csv(root / "livec.csv")
        data = (root / "Images" / table["image"].iloc[0]).read_bytes()
        (root / "Images" / BAD_ROWS[0]).write_bytes(data)
        (root / "Images" / BAD_ROWS[2]).write_bytes(data[: len(data) // 2])
        bad = pd.DataFrame({"image": list(BAD_ROWS), "mos": [float("nan"), 50.0, 60.0]})
        pd.concat([table.iloc[:3], bad, table.iloc[3:]]).to_csv(root / "livec.csv", index=False, na_rep="nan")
        return list(BAD_ROWS)

    return spoil
