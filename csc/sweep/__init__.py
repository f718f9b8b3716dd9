"""The sweep service: shared producer actor, Ray Tune trials, MLflow tracking, reports."""
