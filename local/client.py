"""HTTP to an endpoint, with the standard library: ``/ping``, ``/invocations``, ``/execution-parameters``.

``invoke_files`` is ``python -m local invoke URL FILE...``: one POST per file, ``Content-Type`` from
the suffix (``.png``, ``.jpg``/``.jpeg``, ``.json``) unless given, ``Accept`` and
``X-Amzn-SageMaker-Custom-Attributes`` passed as SageMaker's runtime passes them.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from local.errors import EndpointError, HarnessError

log = logging.getLogger(__name__)

ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
TARGET_MODEL_HEADER = "X-Amzn-SageMaker-Target-Model"  # InvokeEndpoint's TargetModel (multi-model endpoints)
CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".json": "application/json",
}
INVOKE_TIMEOUT_S = 60.0  # SageMaker's real-time deadline


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)

    def message(self) -> str:
        """The server's ``{"error": ...}`` text, else the start of the body."""
        try:
            return str(self.json().get("error", ""))[:500] or f"HTTP {self.status}"
        except (ValueError, AttributeError):
            return self.body[:200].decode(errors="replace") or f"HTTP {self.status}"


def base_url(url: str) -> str:
    """``http://h:p``, ``http://h:p/`` and ``http://h:p/invocations`` all name the same endpoint."""
    url = url.rstrip("/")
    for suffix in ("/invocations", "/ping"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url


def content_type_for(path: Path, override: str | None = None) -> str:
    if override:
        return override
    try:
        return CONTENT_TYPES[path.suffix.lower()]
    except KeyError:
        raise HarnessError(
            f"cannot tell the content type of {path.name}; pass --content-type "
            f"(known suffixes: {', '.join(CONTENT_TYPES)})"
        ) from None


def request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = INVOKE_TIMEOUT_S,
) -> Reply:
    """One HTTP request; any status comes back as a :class:`Reply`, no answer raises EndpointError."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return Reply(response.status, response.headers.get("Content-Type", ""), response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.headers.get("Content-Type", "") if exc.headers else "", exc.read())
    except (urllib.error.URLError, OSError) as exc:
        raise EndpointError(f"{method} {url}: no answer ({exc})") from None


def ping(url: str, timeout: float = 2.0) -> bool:
    try:
        return request("GET", base_url(url) + "/ping", timeout=timeout).ok
    except EndpointError:
        return False


def invoke(
    url: str,
    body: bytes,
    content_type: str,
    accept: str = "application/json",
    attributes: str | None = None,
    timeout: float = INVOKE_TIMEOUT_S,
    target_model: str | None = None,
) -> Reply:
    headers = {"Content-Type": content_type, "Accept": accept}
    if attributes:
        headers[ATTRIBUTES_HEADER] = attributes
    if target_model:
        headers[TARGET_MODEL_HEADER] = target_model
    return request("POST", base_url(url) + "/invocations", body, headers, timeout)


def execution_parameters(url: str) -> dict[str, Any] | None:
    """The server's batch-transform preferences, or None when it has no such route."""
    reply = request("GET", base_url(url) + "/execution-parameters", timeout=10.0)
    if not reply.ok:
        return None
    try:
        data = reply.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def output_name(path: Path) -> str:
    """Batch transform's naming: ``<input name>.out``."""
    return path.name + ".out"


def invoke_files(
    url: str,
    files: list[Path],
    accept: str,
    content_type: str | None,
    attributes: str | None,
    out_dir: Path | None,
    stdout: TextIO,
    target_model: str | None = None,
) -> list[tuple[str, str]]:
    """POST each file; write ``<name>.out`` into ``out_dir`` or JSON to ``stdout``. Returns failures."""
    failures: list[tuple[str, str]] = []
    if out_dir is None and not accept.endswith("json"):
        raise HarnessError(f"--accept {accept} answers binary data; pass --out DIR")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    for path in files:
        if not path.is_file():
            raise HarnessError(f"{path} is not a file")
        body, ctype = path.read_bytes(), content_type_for(path, content_type)
        reply = invoke(url, body, ctype, accept, attributes, target_model=target_model)
        if not reply.ok:
            failures.append((path.name, f"HTTP {reply.status}: {reply.message()}"))
            log.error("%s: HTTP %d: %s", path.name, reply.status, reply.message())
            continue
        if out_dir is not None:
            (out_dir / output_name(path)).write_bytes(reply.body)
            log.info("%s -> %s", path.name, out_dir / output_name(path))
        else:
            stdout.write(reply.body.decode(errors="replace").rstrip("\n") + "\n")
    return failures
