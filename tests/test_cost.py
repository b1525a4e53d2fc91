"""What a model costs: parameters, PyTorch-counted FLOPs and latency per image."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from iqa_ray.evaluation.cost import COST_METRICS, count_flops, count_params, measure_cost, time_forward

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Scorer(nn.Module):
    """conv 3->8 (3x3, no padding) -> global mean -> linear 8->1, returning the engine's dict."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.fc = nn.Linear(8, 1, bias=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"score": self.fc(self.conv(x).mean(dim=(2, 3))).squeeze(1)}


def test_flops_are_the_hand_count_of_convolutions_and_matmuls():
    model = Scorer()
    x = torch.rand(4, 3, 10, 12)  # 4 patches of one image
    conv = 2 * 4 * 8 * (8 * 10) * (3 * 3 * 3)  # 2 x patches x out channels x output pixels x (in x kh x kw)
    fc = 2 * 4 * 8 * 1
    assert count_flops(model, x) == conv + fc
    assert count_params(model) == 8 * 3 * 3 * 3 + 8


def test_cost_of_one_image_and_per_image_at_the_batch_size():
    model = Scorer()
    cost = measure_cost(model, torch.rand(4, 3, 10, 12), batch_size=8, warmup=1, repeats=3)
    assert cost.params_m == pytest.approx(224 / 1e6)
    assert cost.gflops == pytest.approx((2 * 4 * 8 * 80 * 27 + 64) / 1e9)
    assert cost.latency_ms > 0 and cost.latency_batch_ms > 0
    assert cost.input_shape == (4, 3, 10, 12) and cost.batch_size == 8 and cost.device == "cpu"
    assert set(cost.metrics()) == set(COST_METRICS) and not model.training


def test_a_slower_model_measures_slower():
    fast, slow = nn.Conv2d(3, 4, 3), nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=1) for _ in range(20)])
    x = torch.rand(8, 3, 96, 96)
    assert time_forward(slow, x, warmup=1, repeats=3) > time_forward(fast, x, warmup=1, repeats=3)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"repeats": 0}, "repeats >= 1"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_cost(Scorer(), torch.rand(1, 3, 8, 8), **kwargs)


def test_input_must_be_one_images_patches():
    with pytest.raises(ValueError, match=r"\(patches, 3, H, W\), got \(3, 8, 8\)"):
        measure_cost(Scorer(), torch.rand(3, 8, 8))


def test_a_configs_cost_is_its_models_at_the_evaluation_input(tiny_dataset):
    from iqa_ray.evaluation.cost import model_cost
    from iqa_ray.training.build import build
    from iqa_ray.training.config import TrainConfig
    from iqa_ray.training.loaders import load_decoded

    config = TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "crop_size": 48, "eval_patches": 3,
                                    "eval_batch_size": 4, "family": "mlp", "hidden_dim": 16, "pretrained": "offline"})
    decoded = load_decoded(config)
    cost = model_cost(config, decoded, "cpu", warmup=1, repeats=2)
    model = build(config, torch.device("cpu"))
    assert cost.params_m == pytest.approx(count_params(model) / 1e6)
    assert cost.input_shape == (3, 3, 48, 48) and cost.batch_size == 4
    assert cost.gflops == pytest.approx(count_flops(model.eval(), torch.rand(3, 3, 48, 48)) / 1e9)
    bigger = model_cost(TrainConfig.from_dict({**config.to_dict(), "eval_patches": 6}), decoded, "cpu", warmup=1, repeats=2)
    assert bigger.gflops == pytest.approx(2 * cost.gflops)  # twice the patches per image


def test_the_batched_timing_is_capped_by_pixels_and_records_the_batch_it_timed():
    model = Scorer()
    image = torch.rand(4, 3, 16, 16)  # 1,024 pixels per image
    capped = measure_cost(model, image, batch_size=64, warmup=0, repeats=1, max_batch_pixels=8 * 1024)
    assert capped.batch_size == 8
    tiny_cap = measure_cost(model, image, batch_size=64, warmup=0, repeats=1, max_batch_pixels=10)
    assert tiny_cap.batch_size == 1  # at least one image
    assert measure_cost(model, image, batch_size=64, warmup=0, repeats=1).batch_size == 64
    with pytest.raises(ValueError, match="max_batch_pixels must be >= 1"):
        measure_cost(model, image, max_batch_pixels=0)


def test_a_cpu_trials_batched_timing_stays_small(tiny_dataset):
    from iqa_ray.evaluation.cost import CPU_BATCH_PIXELS, model_cost
    from iqa_ray.training.config import TrainConfig
    from iqa_ray.training.loaders import load_decoded

    config = TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "crop_size": 64, "eval_patches": 4,
                                    "eval_batch_size": 64, "family": "mlp", "hidden_dim": 16, "pretrained": "offline"})
    cost = model_cost(config, load_decoded(config), "cpu", warmup=0, repeats=1)
    assert cost.batch_size == CPU_BATCH_PIXELS // (4 * 64 * 64) < 64
