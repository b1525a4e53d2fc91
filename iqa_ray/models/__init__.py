"""Quality models: timm backbones, the model families built on them, and their losses.

Nothing in this package knows about data files or Ray Tune.
"""
