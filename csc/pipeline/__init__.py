"""One run end to end: activations -> trainer -> checkpoints -> evaluation -> export, and its figures."""
