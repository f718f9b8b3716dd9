"""The contrastive SAE: model, constrained optimiser, losses, trainer, metrics, export.

Never imports Ray or MLflow.
"""
