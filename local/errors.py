"""Errors the harness raises; :func:`local.cli.main` maps each to a message and an exit code."""

from __future__ import annotations


class HarnessError(Exception):
    """Something a person can fix (bad arguments, missing image, unsafe archive); exit code 2."""

    exit_code = 2


class UnsafeArchiveError(HarnessError):
    """A model archive holds a member that would land outside the extraction folder."""


class JobFailed(Exception):
    """The training job (or a host of it) exited non-zero; ``reason`` comes from output/failure."""

    def __init__(self, reason: str, exit_code: int = 1):
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


class EndpointError(HarnessError):
    """The server did not come up, or died."""
