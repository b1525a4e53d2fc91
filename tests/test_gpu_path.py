"""The GPU path, tested where it can be on CPU: a step that never waits for the device, fp16 with a
gradient scaler and bf16, chunked evaluation, DataLoader workers that read the decoded images in
place, and checkpoints that hold each tensor once, every ``checkpoint_every`` epochs."""

import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from iqa_ray.core.options import ConfigError
from iqa_ray.data.decoded import DecodedImages, IQADataset
from iqa_ray.training.build import build, memory_format
from iqa_ray.training.checkpoints import load_checkpoint
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.engine import NonFiniteLossError, fit
from iqa_ray.training.features import compute_features
from iqa_ray.training.inference import predict
from iqa_ray.training.loaders import eval_dataset, eval_loader, load_decoded, loader_kwargs, make_loaders
from iqa_ray.training.schedule import build_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def cached(tiny_dataset, **kw):
    base = {"dataset": str(tiny_dataset.path), "crop_size": 32, "whole_image": True, "feature_cache": True,
            "family": "mlp", "pooling": "stages", "frozen_backbone": True, "pretrained": "offline",
            "hidden_dim": 32, "batch_size": 4, "epochs": 2, "lr": 3e-3, "patches_per_image": 2, "amp": False}
    base.update(kw)
    return TrainConfig.from_dict(base)


def images_run(tiny_dataset, **kw):
    base = {"dataset": str(tiny_dataset.path), "crop_size": 48, "batch_size": 8, "eval_batch_size": 32,
            "epochs": 2, "lr": 3e-3, "family": "mlp", "hidden_dim": 16, "pretrained": "offline"}
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def decoded(tiny_dataset):
    return load_decoded(cached(tiny_dataset))


@pytest.fixture(scope="module")
def features(tiny_dataset, decoded):
    return compute_features(decoded, cached(tiny_dataset))


# ----------------------------------------------------------------------------- the step


SYNCING = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy")


def count_host_reads(monkeypatch):
    """Count every call from iqa-ray's code to a Tensor method that makes the host wait for a
    device's result (torch's own optimisers keep their step counters on the host by design)."""
    counts = {"n": 0}
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + "iqa_ray" + os.sep
    for name in SYNCING:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(package):
                counts["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_the_training_step_never_waits_for_the_device(tiny_dataset, decoded, features, monkeypatch):
    """Three times the steps per epoch, the same number of host reads: none of them is per step."""
    runs = {}
    for repeats in (2, 6):
        config = cached(tiny_dataset, patches_per_image=repeats, finite_check_every=10_000)
        with monkeypatch.context() as m:
            counts = count_host_reads(m)
            steps = []
            fit(config, decoded, features=features, score_test=False,
                on_epoch_end=lambda e: steps.append(e.metrics["epoch"]))
        runs[repeats] = counts["n"]
    assert runs[2] > 0  # the counter works: the epoch-end checks and metrics read results
    assert runs[6] == runs[2]


def test_finiteness_is_read_every_n_steps_and_still_names_the_first_bad_step(tiny_dataset, decoded, features,
                                                                             monkeypatch):
    from iqa_ray.models.mlp import MLPIQA

    real = MLPIQA.compute_loss
    calls = {"n": 0}

    def poisoned_at_step_3(self, outputs, target):
        losses = real(self, outputs, target)
        calls["n"] += 1
        if calls["n"] == 4:  # step 3 of epoch 0 (0-based)
            losses["loss"] = losses["loss"] * float("inf")
        return losses

    monkeypatch.setattr(MLPIQA, "compute_loss", poisoned_at_step_3)
    for every in (1, 1000):
        calls["n"] = 0
        with pytest.raises(NonFiniteLossError, match=r"became inf at epoch 0 \(0-based\), step 3;"):
            fit(cached(tiny_dataset, finite_check_every=every), decoded, features=features)


def test_check_and_checkpoint_periods_are_validated():
    for key in ("finite_check_every", "checkpoint_every"):
        with pytest.raises(ConfigError, match=f"{key} must be an integer >= 1, got 0"):
            TrainConfig.from_dict({key: 0})
    with pytest.raises(ConfigError, match="eval_chunk must be an integer >= 1"):
        TrainConfig.from_dict({"eval_chunk": 0})
    with pytest.raises(ConfigError, match="channels_last must be true or false"):
        TrainConfig.from_dict({"channels_last": "yes"})


# ----------------------------------------------------------------------------- mixed precision


@pytest.mark.slow  # float16 convolutions are emulated on CPU: about 10 s per epoch here
@pytest.mark.in_process
def test_an_fp16_run_uses_the_gradient_scaler_and_resumes_exactly(tiny_dataset, tmp_path):
    """fp16 autocast (CPU here, the V100/T4 path on CUDA): finite float32 losses and scores, the
    scaler's state in the checkpoint, and a resumed run equal to an uninterrupted one."""
    config = images_run(tiny_dataset, amp="fp16", epochs=2, crop_size=32)
    decoded = load_decoded(config)
    whole = fit(config, decoded, device="cpu")
    assert all(np.isfinite(h["train_loss"]) for h in whole.history)
    pred, _ = whole.test_predictions
    assert pred.dtype == np.float64 and len(np.unique(pred)) == len(pred)

    first = fit(config, decoded, device="cpu", max_epochs=1,
                on_epoch_end=lambda e: e.save(tmp_path))
    state = load_checkpoint(tmp_path)
    assert state["scaler"]["scale"] > 0  # the loss scale travels with the checkpoint
    resumed = fit(config, decoded, device="cpu", resume=tmp_path)
    assert len(first.history) == 1
    assert [h["val_srcc"] for h in resumed.history] == [h["val_srcc"] for h in whole.history]
    assert resumed.test == whole.test


def test_a_float32_run_stores_no_scaler_state(tiny_dataset, decoded, features, tmp_path):
    fit(cached(tiny_dataset, epochs=1), decoded, features=features, on_epoch_end=lambda e: e.save(tmp_path))
    assert load_checkpoint(tmp_path)["scaler"] == {}


# ----------------------------------------------------------------------------- evaluation


def test_evaluation_in_chunks_gives_the_scores_of_one_pass(tiny_dataset):
    config = images_run(tiny_dataset, eval_patches=5)
    decoded = load_decoded(config)
    model = build(config, CPU)
    model.set_label_stats(50.0, 20.0)
    loader = eval_loader(config, eval_dataset(config, decoded, "val"))
    whole, mos = predict(model, loader, CPU, chunk=10_000)
    chunked, mos2 = predict(model, loader, CPU, chunk=3)  # 3 does not divide 5 patches per image
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mos, mos2)


def test_evaluation_forward_passes_never_exceed_the_chunk(tiny_dataset):
    config = images_run(tiny_dataset, eval_patches=5, eval_chunk=7, eval_batch_size=32)
    decoded = load_decoded(config)
    model = build(config, CPU)
    model.set_label_stats(50.0, 20.0)
    sizes = []
    handle = model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        predict(model, eval_loader(config, eval_dataset(config, decoded, "val")), CPU, chunk=config.data.eval_chunk)
    finally:
        handle.remove()
    assert max(sizes) == 7 and sum(sizes) == 5 * len(decoded.split_indices("val"))


# ----------------------------------------------------------------------------- device switches


def test_device_switches_apply_where_they_are_safe(tiny_dataset):
    resnet = images_run(tiny_dataset, backbone="resnet18", pretrained="none")
    assert memory_format(resnet, CUDA) is torch.channels_last
    assert memory_format(resnet, CPU) is None
    assert memory_format(resnet.replace(channels_last=False), CUDA) is None
    swin = images_run(tiny_dataset, backbone="swin_tiny_patch4_window7_224", pretrained="none", crop_size=224)
    assert memory_format(swin, CUDA) is None  # transformers keep their layout
    model = build(images_run(tiny_dataset), CPU)
    assert build_optimizer(images_run(tiny_dataset), model).defaults.get("fused")  # every parameter on the CPU
    assert not build_optimizer(images_run(tiny_dataset, fused_optimizer=False), model).defaults.get("fused")
    assert not build_optimizer(images_run(tiny_dataset, optimizer="sgd"), model).defaults.get("fused")


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_the_fused_cpu_optimizer_takes_the_steps_the_default_one_takes(tiny_dataset, decoded, features, optimizer):
    fused = fit(cached(tiny_dataset, optimizer=optimizer, weight_decay=1e-2), decoded, features=features)
    plain = fit(cached(tiny_dataset, optimizer=optimizer, weight_decay=1e-2, fused_optimizer=False), decoded,
                features=features)
    for a, b in zip(fused.history, plain.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    np.testing.assert_allclose(fused.test_predictions[0], plain.test_predictions[0], rtol=1e-4, atol=1e-4)


def test_loader_workers_are_sized_from_the_cpu_share_on_a_gpu(tiny_dataset):
    auto = images_run(tiny_dataset)
    assert auto.data.num_workers is None
    assert loader_kwargs(auto, CPU, cpus=4) == {"num_workers": 0, "pin_memory": False}
    assert loader_kwargs(auto, CUDA, cpus=4) == {"num_workers": 3, "pin_memory": True, "persistent_workers": True,
                                                 "prefetch_factor": 4}
    assert loader_kwargs(auto, CUDA, cpus=1)["num_workers"] == 1  # never 0 beside a GPU
    assert loader_kwargs(auto, CUDA, cpus=64)["num_workers"] == 8
    assert loader_kwargs(images_run(tiny_dataset, num_workers=2), CPU)["num_workers"] == 2
    with pytest.raises(ConfigError, match="num_workers must be an integer >= 0 or None"):
        TrainConfig.from_dict({"num_workers": -1})


def exclusive_bytes(array: np.ndarray) -> int:
    """Bytes of ``array``'s pages that this process alone maps (/proc/self/pagemap: present and
    "exclusively mapped", bit 56): pages it owns, as opposed to pages it shares with its parent
    since the fork.

    Counted over the array's own pages only. The whole process's unique memory (USS) is not a
    measure of them: a page shared since the fork becomes unique to the worker as soon as the parent
    writes to its own copy of it (its heap, the garbage collector), and under pytest-xdist the parent
    is a worker that has run hundreds of tests; that made the USS figure grow by 22 MB with no image
    copied."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = array.ctypes.data // page
    end = (array.ctypes.data + array.nbytes + page - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start * 8)
        entries = np.frombuffer(f.read((end - start) * 8), dtype=np.uint64)
    present, exclusive = np.uint64(1 << 63), np.uint64(1 << 56)
    return int(np.count_nonzero((entries & present != 0) & (entries & exclusive != 0))) * page


class _MemoryProbe(IQADataset):
    """IQADataset that reports the worker's pid and, at the last item of each batch of 5, how many
    bytes of the decoded images it owns (:func:`exclusive_bytes`); ``copy_cache`` makes the worker
    hold a copy of them, as a pickled dataset would, and counts the copy's pages instead."""

    copy_cache = False

    def __getitem__(self, i):
        if self.copy_cache and not hasattr(self, "_copy"):
            self._copy = np.array(self.decoded.images)
        source = self._copy if self.copy_cache else self.decoded.images
        item = super().__getitem__(i)
        owned = exclusive_bytes(source) if i % 5 == 4 else 0  # a pagemap read per batch, not per image
        return {**item, "pid": os.getpid(), "owned": owned}


def worker_owned_bytes(decoded, n, copy_cache):
    config = TrainConfig.from_dict({"num_workers": 2, "crop_size": 32, "whole_image": True})
    kw = loader_kwargs(config, CPU)
    assert kw["num_workers"] == 2 and kw["persistent_workers"]
    dataset = _MemoryProbe(decoded, np.arange(n), train=False, crop_size=32, whole_image=True)
    dataset.copy_cache = copy_cache
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=False, **kw)
    growth, seen = {}, []
    for batch in loader:
        seen.append(batch["image"][:, 0])
        for pid, owned in zip(batch["pid"].tolist(), batch["owned"].tolist()):
            growth[pid] = max(growth.get(pid, 0), owned)
    # the workers delivered every image, intact
    assert torch.equal(torch.cat(seen), torch.from_numpy(decoded.images).permute(0, 3, 1, 2))
    assert len(growth) == 2
    return growth


def test_loader_workers_read_the_decoded_images_without_copying_them():
    n, side = 1600, 192  # 177 MB of decoded images, every one read whole by the two workers
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    table = pd.DataFrame({"split": ["val"] * n, "mos": rng.uniform(0, 100, n), "group": np.arange(n).astype(str)})
    decoded = DecodedImages(images=images, table=table)
    # The workers own almost none of the images: they read the parent's pages in place.
    for pid, growth in worker_owned_bytes(decoded, n, copy_cache=False).items():
        assert growth < 0.1 * images.nbytes, (pid, growth)
    # The measure sees a copy when there is one.
    for pid, growth in worker_owned_bytes(decoded, n, copy_cache=True).items():
        assert growth > 0.9 * images.nbytes, (pid, growth)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoints_hold_each_tensor_once_and_resume_exactly_from_any_of_them(tiny_dataset, decoded, features,
                                                                                tmp_path):
    config = cached(tiny_dataset, epochs=4, select_epoch="best")
    whole = fit(config, decoded, features=features)
    saved = []

    def save(e):
        saved.append((e.epoch, e.is_best, e.save(tmp_path / str(e.epoch))))

    fit(config, decoded, features=features, on_epoch_end=save)
    assert len(saved) == 4
    for epoch, is_best, path in saved:
        state = load_checkpoint(path)
        # The kept weights are stored apart only when they are not this epoch's own.
        assert (state["best_model"] is None) == is_best
        resumed = fit(config, decoded, features=features, resume=path)
        assert [h["val_srcc"] for h in resumed.history] == [h["val_srcc"] for h in whole.history], epoch
        assert resumed.test == whole.test and resumed.best_epoch == whole.best_epoch


def test_checkpoint_every_marks_the_epochs_due_and_always_the_last(tiny_dataset, decoded, features):
    due = []
    fit(cached(tiny_dataset, epochs=5, checkpoint_every=2), decoded, features=features,
        on_epoch_end=lambda e: due.append(e.checkpoint_due))
    assert due == [False, True, False, True, True]


def test_schedulers_stop_epochs_are_checkpointed():
    from iqa_ray.search.tuner import stop_epochs

    class Settings:
        def __init__(self, scheduler, max_epochs=20, grace_period=4, reduction_factor=2):
            self.scheduler, self.max_epochs = scheduler, max_epochs
            self.grace_period, self.reduction_factor = grace_period, reduction_factor

    assert stop_epochs(Settings("asha")) == (4, 8, 16)
    assert stop_epochs(Settings("asha", max_epochs=9, grace_period=1, reduction_factor=3)) == (1, 3)
    assert stop_epochs(Settings("hyperband", max_epochs=5)) == (1, 2, 3, 4, 5)
    assert stop_epochs(Settings("none")) == ()


def test_a_run_on_images_still_trains_with_the_new_step(tiny_dataset):
    config = images_run(tiny_dataset, epochs=3)
    decoded = load_decoded(config)
    result = fit(config, decoded)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert make_loaders(config, decoded).train.num_workers == 0  # CPU: the trial's threads compute


# ----------------------------------------------------------------------------- a GPU share without CUDA
# (the end-to-end runs on a cluster of logical GPUs are in tests/test_gpu_cluster.py)


def test_a_gpu_share_without_cuda_computes_on_the_cpu_and_says_so(monkeypatch):
    import ray

    from iqa_ray.trainables.placement import device_report, worker_device

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # in a Ray worker,
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [1])  # a trial holding a share of GPU 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = worker_device(1)
    assert device == CPU
    assert device_report(device) == {"device": "cpu", "gpu_ids": "1", "cuda_visible_devices": "1"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert worker_device(1) == CUDA  # the same share where CUDA is there: that GPU
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert worker_device(1) == CPU and device_report(CPU) == {"device": "cpu", "gpu_ids": "", "cuda_visible_devices": ""}


def test_a_data_parallel_worker_uses_its_gpu_only_where_cuda_is(monkeypatch):
    import ray.train.torch

    from iqa_ray.trainables.process_group import train_device

    # Ray Train names the worker's GPU whenever Ray gave it one, CUDA or not
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda:1"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_device() == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_device() == torch.device("cuda:1")
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: CPU)
    assert train_device() == CPU


def test_the_workers_start_their_process_group_on_rank_0s_backend(monkeypatch):
    """A worker joins the group rank 0 offers (gloo on the CPU) and refuses, naming both devices, a
    group its device cannot join (NCCL offered to a worker without CUDA)."""
    import ray
    import ray.train.collective
    import torch.distributed as dist

    from iqa_ray.trainables.process_group import start_process_group

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    offered = []
    monkeypatch.setattr(ray.train.collective, "broadcast_from_rank_zero", lambda offer: offered.append(offer) or offer)
    try:
        assert start_process_group(0, 1, CPU, timeout_s=30) == "gloo"
        assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    host, port, backend = offered[0]
    assert (host, backend) == ("127.0.0.1", "gloo") and port > 0
    monkeypatch.setattr(ray.train.collective, "broadcast_from_rank_zero", lambda offer: ("127.0.0.1", port, "nccl"))
    with pytest.raises(RuntimeError, match=r"worker 1 computes on cpu \(gloo\) but rank 0 chose nccl"):
        start_process_group(1, 2, CPU)
    assert not dist.is_initialized()


def test_the_note_on_a_gpu_share_without_cuda_is_printed_once():
    import io
    from types import SimpleNamespace

    from iqa_ray.search.console import DeviceNote, device_note

    cpu_share = {"device": "cpu", "gpu_ids": "0", "cuda_visible_devices": "0", "epoch": 1}
    assert device_note("a", {"device": "cpu", "gpu_ids": "", "cuda_visible_devices": ""}) is None  # no share
    assert device_note("a", {"device": "cuda", "gpu_ids": "0", "cuda_visible_devices": "0"}) is None  # on its GPU
    assert device_note("a", {"device": "cpu", "gpu_ids": float("nan")}) is None  # not reported (an older trial)
    assert device_note("a", {"epoch": 1}) is None
    note = device_note("a", cpu_share)
    assert note.startswith("note: trial a holds GPU 0 (CUDA_VISIBLE_DEVICES=0) but finds no CUDA, so it trains on "
                           "the CPU;")
    ddp = device_note("d", {**cpu_share, "worker_gpu_ids": "0;1", "process_group": "gloo",
                            "cuda_visible_devices": "0,1"})
    assert "trial d holds GPUs 0, 1 (CUDA_VISIBLE_DEVICES=0,1)" in ddp and "data-parallel workers on gloo" in ddp

    out = io.StringIO()
    callback = DeviceNote(out=out)
    for trial_id, epoch in (("c", 1), ("a", 1), ("a", 2), ("b", 1), ("b", 2)):
        report = {"device": "cuda", "gpu_ids": "1"} if trial_id == "c" else {**cpu_share, "epoch": epoch}
        callback.on_trial_result(0, [], SimpleNamespace(trial_id=trial_id), report)
    assert out.getvalue() == note + "\n"  # one line for the search, not one per trial or epoch
    assert callback.noted == "a"


def test_the_summary_and_the_export_record_where_each_trial_trained(tmp_path):
    import json
    from types import SimpleNamespace

    from iqa_ray.search.export import collect
    from iqa_ray.search.summary import trained_on

    rows = {"a": {"device": "cpu", "gpu_ids": "0", "cuda_visible_devices": "0"},
            "b": {"device": "cuda", "gpu_ids": "0", "cuda_visible_devices": "0"},
            "c": {"device": "cpu", "gpu_ids": "", "cuda_visible_devices": ""}}
    record = trained_on({t: (SimpleNamespace(), [{"epoch": 1, **r}]) for t, r in rows.items()})
    assert record["trials"] == {"cpu": 2, "cuda": 1} and record["gpu_share_without_cuda"] == ["a"]
    assert record["note"].startswith("note: trial a holds GPU 0")
    assert "note" not in trained_on({"b": (SimpleNamespace(), [{"epoch": 1, **rows["b"]}])})

    exp = tmp_path / "exp"
    for trial_id, r in rows.items():
        (exp / f"trial_{trial_id}").mkdir(parents=True)
        (exp / f"trial_{trial_id}" / "params.json").write_text(json.dumps({"lr": 0.01, "epochs": 1}))
        (exp / f"trial_{trial_id}" / "result.json").write_text(
            json.dumps({"trial_id": trial_id, "epoch": 1, "val_srcc": 0.5, **r}) + "\n")
    trials, epochs = collect(exp)
    trials = trials.set_index("trial_id")
    assert trials.device.to_dict() == {"a": "cpu", "b": "cuda", "c": "cpu"}
    assert trials.gpu_ids.to_dict() == {"a": "0", "b": "0", "c": ""}
    assert epochs.set_index("trial_id").cuda_visible_devices.to_dict() == {"a": "0", "b": "0", "c": ""}
