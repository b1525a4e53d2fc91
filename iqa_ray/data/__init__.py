"""Data layer: reference sources, distortions, labels, pre-generation and training datasets.

Nothing in this package knows about models or Ray Tune.
"""
