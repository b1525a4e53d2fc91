"""Training: the run config, the one training loop (:func:`iqa_ray.training.engine.fit`) and what it
uses (feeds, loaders, optimiser and schedule, device and precision, checkpoints, data-parallel
bookkeeping, inference, the frozen-feature cache). It knows models, data and metrics, not Ray."""
