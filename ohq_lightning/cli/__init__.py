"""The Hydra job of ``python -m ohq_lightning``: config schemas, data, model, evaluation and reports."""
