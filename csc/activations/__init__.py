"""Corpus -> tokens -> LM forward up to the hooked layer -> activation shards and training batches.

Never imports Ray or MLflow.
"""
