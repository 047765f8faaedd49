"""Mask R-CNN under the Amazon SageMaker container contract: training and serving.

Packages: train (the `train` process: config, data, engine, the job), serve (the `serve` process:
settings, supervisor, app, predictor), model (both: architectures and the saved-model format). Modules
both use: contract (exit codes, failure file, log format), errors, device; cli (the `train` and `serve`
entrypoints).
Importing the package imports nothing heavy.
"""

__version__ = "0.1.0"
