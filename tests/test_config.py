import json

import pytest

from iqa_ray.core.options import ConfigError
from iqa_ray.training.config import TrainConfig, valid_keys


def test_flat_and_nested_keys_build_the_same_config():
    flat = TrainConfig.from_dict({"lr": 3e-4, "alpha": 0.3, "loss": "ranking", "crop_size": 96})
    nested = TrainConfig.from_dict({"optim": {"lr": 3e-4}, "model": {"alpha": 0.3, "loss": "ranking"},
                                    "data": {"crop_size": 96}})
    assert flat == nested
    assert flat.optim.lr == 3e-4 and flat.model.alpha == 0.3 and flat.data.crop_size == 96
    assert TrainConfig.from_dict(flat.to_dict()) == flat
    assert flat.replace(lr=1e-2).optim.lr == 1e-2 and flat.optim.lr == 3e-4  # frozen, copied


@pytest.mark.parametrize(
    "values, match",
    [
        ({"learning_rate": 1e-3}, "unknown config keys \\['learning_rate'\\]; valid keys"),
        ({"family": "transformer"}, "unknown model family 'transformer'; valid: mlp, gmm, hyperiqa"),
        ({"backbone": "resnet9000"}, "unknown backbone 'resnet9000'; valid: .*resnet18"),
        ({"loss": "ranking", "alpha": 1.5}, "alpha must be in \\[0, 1\\], got 1.5"),
        ({"loss": "ranking", "alpha": -0.1}, "alpha must be in \\[0, 1\\]"),
        ({"loss": "ranking", "margin": -0.5}, "margin must be >= 0, got -0.5"),
        ({"family": "gmm", "n_clusters": 0}, "n_clusters must be an integer >= 1, got 0"),
        ({"lr": 0}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be > 0"),
        ({"lr_schedule": "linear"}, "unknown lr_schedule 'linear'; valid: cosine, step, plateau, none"),
        ({"optimizer": "lamb"}, "unknown optimizer 'lamb'"),
        ({"batch_size": 1}, "batch_size must be an integer >= 2"),
        ({"epochs": 3, "warmup_epochs": 3}, "warmup_epochs must be in \\[0, epochs=3\\)"),
        ({"label": "psnr"}, "label must be one of"),
        ({"alpha": 0.3}, "alpha=0.3 only applies to loss='ranking'"),
        ({"family": "mlp", "n_clusters": 4}, "n_clusters applies to family gmm only, not 'mlp'"),
        ({"family": "hyperiqa", "hidden_dim": 64}, "hidden_dim applies to family mlp/gmm only"),
        ({"crop_size": "128"}, "crop_size must be an integer"),
    ],
)
def test_bad_values_are_rejected_with_the_key_and_what_is_valid(values, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(values)


def test_family_kwargs_pick_only_the_familys_arguments():
    gmm = TrainConfig.from_dict({"family": "gmm", "n_clusters": 4}).model.family_kwargs()
    assert gmm["n_clusters"] == 4 and "multiscale" not in gmm
    hyper = TrainConfig.from_dict({"family": "hyperiqa", "multiscale": True}).model.family_kwargs()
    # HyperIQA's layer sizes are its options too (settable), at the paper's values by default
    assert hyper == {"multiscale": True, "hyper_channels": 112, "target_in": 224, "target_sizes": (112, 56, 28, 14),
                     "lda_dim": 16, "lda_channels": 16, "lda_grid": 4, "hypernet_lr_mult": 10.0}
    assert "n_clusters" not in TrainConfig.from_dict({"family": "hyperiqa"}).to_dict()["model"]
    # a record written as JSON (lists for tuples) with another family's keys at their defaults loads
    record = json.loads(json.dumps(TrainConfig.from_dict({"family": "hyperiqa"}).to_dict()))
    assert record["model"]["target_sizes"] == [112, 56, 28, 14]
    assert TrainConfig.from_dict(record, family="mlp").model.options == TrainConfig.from_dict({"family": "mlp"}).model.options


def test_valid_keys_cover_every_section():
    keys = valid_keys()
    for k in ("dataset", "crop_size", "family", "backbone", "alpha", "margin", "n_clusters", "lr", "lr_schedule"):
        assert k in keys


def test_the_old_key_scheduler_is_read_as_lr_schedule_with_a_deprecation_message():
    with pytest.warns(FutureWarning, match="the key 'scheduler' is deprecated, use 'lr_schedule'"):
        old = TrainConfig.from_dict({"scheduler": "step"})
    assert old.optim.lr_schedule == "step" and old == TrainConfig.from_dict({"lr_schedule": "step"})
    assert "scheduler" not in old.flat() and old.flat()["lr_schedule"] == "step"
    with pytest.raises(ConfigError, match="both 'scheduler' \\(its old name\\) and 'lr_schedule'"):
        TrainConfig.from_dict({"scheduler": "step", "lr_schedule": "cosine"})
    # a checkpoint written before the rename stores {"optim": {"scheduler": ...}}: it still loads
    with pytest.warns(FutureWarning):
        assert TrainConfig.from_dict({"optim": {"scheduler": "plateau"}}).optim.lr_schedule == "plateau"


def test_lists_read_from_json_or_toml_become_tuples_by_the_field_type_in_every_config():
    import dataclasses

    from iqa_ray.core.options import Options

    cfg = TrainConfig.from_dict({"dataset": "embedded", "family": "hyperiqa", "image_size": [256, 192],
                                 "split_fractions": [0.6, 0.2, 0.2], "target_sizes": [56, 28]})
    assert cfg.data.image_size == (256, 192) and cfg.data.split_fractions == (0.6, 0.2, 0.2)
    assert cfg.model.options.target_sizes == (56, 28)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # another family's tuple key, written as a JSON list: harmless at its default, refused away from it
    TrainConfig.from_dict({"dataset": "embedded", "family": "mlp", "target_sizes": [112, 56, 28, 14]})
    with pytest.raises(ConfigError, match="target_sizes applies to family hyperiqa"):
        TrainConfig.from_dict({"dataset": "embedded", "family": "mlp", "target_sizes": [56, 28]})

    @dataclasses.dataclass(frozen=True)
    class Sizes(Options):  # a plug-in's options: a tuple field whose default is None, and a list field
        sizes: tuple[int, ...] | None = None
        names: list[str] = dataclasses.field(default_factory=list)

    got = Sizes.from_dict({"sizes": [1, 2], "names": ["a"]})
    assert got.sizes == (1, 2) and isinstance(got.sizes, tuple) and got.names == ["a"]
