"""Typed errors, raised where a problem is found and mapped to an outcome in one place.

Training: :func:`maskrcnn.cli.train_main` turns any :class:`JobError` into the first line of
``/opt/ml/output/failure`` and a non-zero exit. Serving: :mod:`maskrcnn.app` turns any
:class:`RequestError` into its HTTP status with a JSON message.
"""

from __future__ import annotations


class JobError(Exception):
    """A training-job problem a person can act on; its message is the failure reason."""


class ConfigError(JobError):
    """Hyperparameters, channels or config files are wrong."""


class DataError(JobError):
    """The dataset is missing, empty, unreadable or inconsistent."""


class NonFiniteLossError(JobError):
    """The loss became NaN or infinite; training cannot continue meaningfully."""


class PeerLostError(JobError):
    """Another host or process of a distributed job went away, hung, or ran different collectives."""


class ModelError(JobError):
    """Model files are missing, unreadable or do not match their description."""


class RequestError(Exception):
    """A bad request to the inference server; ``status`` is the HTTP status to answer with."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class UnsupportedMediaType(RequestError):
    status = 415


class NotAcceptable(RequestError):
    status = 406


class PayloadTooLarge(RequestError):
    status = 413


class ServiceUnavailable(RequestError):
    """The server cannot answer now (model not loaded yet, inference over its deadline); retry later."""

    status = 503
