"""Ray Tune trainables: the only place where Tune meets the engine.

A trainable builds the run's config from the trial's config, resumes from
``tune.get_checkpoint()``, calls :func:`iqa_ray.training.engine.fit` and reports every epoch with
``tune.report(metrics, checkpoint=...)``. It holds no training logic of its own.
"""
