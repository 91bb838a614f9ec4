"""Fine-tune, export, quantize and evaluate classifiers in the bundle layout the worker loads.

Only `data` and `evaluate` are importable without the `[train]` extra; `finetune` needs torch.
"""
