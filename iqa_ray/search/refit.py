"""The model a search hands back: the selected configuration re-trained on training and validation photos.

A search selects a configuration on its validation photos. Where the configuration then chooses
nothing on them (``select_epoch = "last"``, no early stopping, no plateau schedule: the cpu
recipe), those photos have done their job, and the model handed back is better trained on them
too, as scikit-learn's ``GridSearchCV(refit=True)`` does and as IQA papers train on 80 % of a
dataset: after the search, one more Tune trial trains the selected configuration from scratch on
the search split's training and validation photos (``train_on_val``), for its full epochs, and
keeps its final weights. That trial's checkpoint is the model ``summary.json`` names (``model``),
the one the test split is scored on (once), and the one ``iqa-ray score`` / ``load_model`` /
``export-model`` / ``evaluate`` read from the experiment folder. Its trial lives in the
experiment's ``refit/`` folder and appears in ``trials.parquet`` with ``kind = "refit"``.

Where the configuration chooses on validation (``select_epoch = "best"``, early stopping, a plateau
schedule), a refit would have nothing to choose with, so the selected trial's own weights are
handed back, as they are with ``SearchSettings.refit = False`` (``--no-refit``).

What was measured before this became the default (docs/BENCHMARKS.md, "Refit on training and
validation photos"): on LIVE Challenge, the recipe's head trained on all of a cross-validation
fold's other photos instead of three quarters of them gained +0.012 +- 0.004 SRCC (19 of 25 folds).
"""

from __future__ import annotations

from typing import Any, Mapping

from iqa_ray.core.paths import REFIT_DIR
from iqa_ray.training.config import TrainConfig, validation_chooser

REFIT_FIT_ON = "training and validation photos"


def refit_plan(settings: Any, config: TrainConfig) -> tuple[bool, str]:
    """Whether the model handed back is a refit of the selected configuration, and in words why (not)."""
    if not settings.refit:
        return False, "--no-refit: the selected trial's own weights, trained on training photos"
    chooser = validation_chooser(config.optim)
    if chooser:
        return False, f"the selected trial's own weights ({chooser} chooses on validation photos, so no refit)"
    return True, (f"the selected configuration re-trained on {REFIT_FIT_ON} "
                  "(select_epoch = 'last' chooses nothing on validation)")


def run_refit(settings: Any, resolved: Mapping[str, Any], decoded: Any, *, features: Any = None) -> Any:
    """Train the selected configuration on the search split's training and validation photos (one
    Tune trial in ``refit/``) and return its Tune ``Result``.

    Args:
        settings: the search's :class:`~iqa_ray.search.tuner.SearchSettings` (resources, storage).
        resolved: the selected trial's flat run config.
        decoded: the decoded dataset's object-store reference (the search's split, as the trials saw it).
        features: the search's feature cache, if any.
    """
    from ray import tune

    from iqa_ray.trainables.iqa import iqa_trainable

    trainable = tune.with_resources(
        tune.with_parameters(iqa_trainable, decoded=decoded, cpus_per_trial=settings.cpus_per_trial,
                             features=features),
        {"cpu": settings.cpus_per_trial, "gpu": min(settings.gpus_per_trial, 1.0)},
    )
    local = settings.local_experiment_dir()
    storage = str(local) if local is not None else settings.experiment_path()
    tuner = tune.Tuner(
        trainable, param_space={**resolved, "train_on_val": True},
        tune_config=tune.TuneConfig(num_samples=1),
        run_config=tune.RunConfig(name=REFIT_DIR, storage_path=storage, verbose=1 if settings.verbose else 0,
                                  failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    return tuner.fit()[0]


def refit_folder(result: Any) -> str:
    """The refit trial's folder relative to the experiment folder (``refit/<trial folder>``)."""
    return f"{REFIT_DIR}/{str(result.path).rstrip('/').rsplit('/', 1)[-1]}"
