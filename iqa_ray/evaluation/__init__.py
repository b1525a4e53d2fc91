"""Evaluation: scoring trained models. The cross-dataset table, ``load_model`` and scoring your
own photos, portable TorchScript/ONNX exports, what a model costs to run, and the baselines every
summary prints beside a search's result (a linear probe on frozen features, PIQE, BRISQUE)."""
