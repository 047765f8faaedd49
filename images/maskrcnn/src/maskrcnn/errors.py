"""Typed errors, raised where a problem is found and mapped to an outcome in one place.

Training: :func:`maskrcnn.cli.train_main` turns any :class:`JobError` into the first line of
``/opt/ml/output/failure`` and a non-zero exit. Serving: :mod:`maskrcnn.serve.app` turns any
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


class StorageError(JobError):
    """A file the job must write or read could not be: no space, read-only, missing, damaged."""


def storage_error(exc: BaseException, path: object, doing: str, advice: str = "") -> StorageError:
    """``exc`` from writing or reading ``path`` as one line a person can act on: the condition and the path.

    ``doing`` is "writing" or "reading"; ``advice`` replaces the default of what to do.
    """
    import errno

    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.ENOSPC or "os error 28" in text or "No space left" in text:
        condition, default = "no space left on device", "free space or give the job a larger volume"
    elif code == errno.EROFS or "os error 30" in text:
        condition, default = "read-only file system", "the folder must be writable"
    elif code in (errno.EACCES, errno.EPERM) or "os error 13" in text:
        condition, default = "permission denied", "the folder must be writable by the job's user"
    elif code == errno.ENOENT or "os error 2" in text:
        condition, default = "no such file or folder", "the folder must exist"
    else:
        condition, default = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".strip(), ""
    message = f"{condition} {doing} {path}"
    if advice or default:
        message += f"; {advice or default}"
    return StorageError(message)


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


class ServiceUnavailable(RequestError):
    """The server cannot answer now (model not loaded yet, inference over its deadline); retry later."""

    status = 503
