"""Evaluation protocols: kNN, linear probe on cached features, with random-init and raw-pixel baselines.

Run as `python -m ssl_jax.evaluate --workdir=DIR --protocol=knn|linear`.
"""
