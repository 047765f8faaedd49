"""Mask R-CNN under the Amazon SageMaker container contract: training and serving.

Modules: config (the job's settings), data (datasets), synthetic (built-in dataset), model
(architectures and the saved-model format), engine (train_one_epoch / evaluate), training (the
job), predictor and app and server (serving), cli (the `train` and `serve` entrypoints).
Importing the package imports nothing heavy.
"""

__version__ = "0.1.0"
