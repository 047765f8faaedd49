"""The Flask application: routes, and the one place where errors become HTTP statuses.

    app = create_app(predictor, settings)              # tests: a fake or a real Predictor
    app = create_app(predictor, settings, run_blocking) # workers: inference off the event loop

Routes: ``GET /ping`` (200 once the predictor is loaded and warm, 503 before), ``POST
/invocations`` (see :mod:`maskrcnn.serve.codec` for formats and options; every 200 carries a
``Server-Timing`` header with the milliseconds of decode, inference and encode), ``GET /execution-parameters``
(batch transform). Everything else is a JSON 404 (405 for a wrong method).

``run_blocking(fn, timeout)`` runs the CPU-bound part of an invocation (decode, predict, encode)
and returns its result; a gevent worker passes one that runs ``fn`` in a real OS thread so the
worker's event loop keeps answering ``/ping``. The default calls ``fn`` in place.

Status mapping, all here: :class:`~maskrcnn.errors.RequestError` -> its ``status`` (400 bad input,
406, 413, 415, 503); werkzeug's HTTP errors (404, 405, 413 body too large) -> their code; anything
else -> 500, logged with its traceback. Bodies are always ``{"error": "..."}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import numpy as np
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from maskrcnn.errors import NotAcceptable, RequestError, ServiceUnavailable
from maskrcnn.model.format import ModelSpec
from maskrcnn.serve import codec
from maskrcnn.serve.codec import RequestOptions
from maskrcnn.serve.settings import ServeSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
RunBlocking = Callable[[Callable[[], T], float], T]

ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"


class PredictorLike(Protocol):
    ready: bool
    spec: ModelSpec

    def __call__(
        self, image: np.ndarray, score_threshold: float | None = ..., max_detections: int | None = ...
    ) -> Any: ...


def call_now(fn: Callable[[], T], timeout: float) -> T:
    """Run in the calling thread (Flask's dev server, the test client); no deadline is enforced."""
    return fn()


def answer(
    predictor: PredictorLike,
    body: bytes,
    content_type: str | None,
    response_type: str,
    options: RequestOptions,
    settings: ServeSettings,
) -> tuple[bytes, str, str]:
    """Bytes in, bytes out: decode every image, predict, encode. Runs off the event loop.

    Returns the payload, its media type and a ``Server-Timing`` header value (milliseconds spent in
    decode, inference and encode), so a client can tell the model's time from everything else's.
    """
    started = time.perf_counter()
    images = codec.decode_request(
        body, content_type, max_pixels=settings.max_image_pixels, max_images=settings.max_images
    )
    if response_type == codec.PNG_TYPE and len(images) != 1:
        raise NotAcceptable(f"{codec.PNG_TYPE} answers exactly one image; this request holds {len(images)}")
    decoded = time.perf_counter()
    results = [predictor(image, options.score_threshold, options.max_detections) for image in images]
    predicted = time.perf_counter()
    names = predictor.spec.class_names
    if response_type == codec.PNG_TYPE:
        payload, mimetype = codec.encode_png(images[0], results[0], names), codec.PNG_TYPE
    else:
        payload, mimetype = codec.encode_json(results, names, options.mask_format), codec.JSON_TYPE
    timing = ", ".join(
        f"{name};dur={1000 * seconds:.2f}"
        for name, seconds in (
            ("decode", decoded - started),
            ("inference", predicted - decoded),
            ("encode", time.perf_counter() - predicted),
        )
    )
    return payload, mimetype, timing


def create_app(predictor: PredictorLike, settings: ServeSettings, run_blocking: RunBlocking | None = None) -> Flask:
    app = Flask("maskrcnn")
    # werkzeug answers 413 itself once Content-Length passes this (nginx does too, in front).
    app.config["MAX_CONTENT_LENGTH"] = settings.max_payload_bytes
    run = run_blocking or call_now
    spec = predictor.spec
    defaults = RequestOptions(spec.score_threshold, spec.max_detections, "rle")

    @app.get("/ping")
    def ping() -> Response:
        if not predictor.ready:
            raise ServiceUnavailable("the model is not loaded yet")
        return Response(status=200)

    @app.get("/execution-parameters")
    def execution_parameters() -> Response:
        return jsonify(
            MaxConcurrentTransforms=settings.max_concurrent_transforms,
            BatchStrategy=settings.batch_strategy,
            MaxPayloadInMB=settings.max_payload_mb,
        )

    @app.post("/invocations")
    def invocations() -> Response:
        if not predictor.ready:
            raise ServiceUnavailable("the model is not loaded yet")
        # Cheap checks first, so a bad header costs no decoding.
        response_type = codec.negotiate(request.headers.get("Accept"))
        options = codec.parse_attributes(request.headers.get(ATTRIBUTES_HEADER), defaults, spec.max_detections)
        content_type = request.mimetype  # werkzeug's: lower case, parameters (charset ...) dropped
        codec.check_content_type(content_type)
        body = request.get_data(cache=False)
        payload, mimetype, timing = run(
            lambda: answer(predictor, body, content_type, response_type, options, settings),
            settings.timeout_s,
        )
        return Response(payload, status=200, mimetype=mimetype, headers={"Server-Timing": timing})

    register_error_handlers(app)
    return app


def register_error_handlers(app: Flask) -> None:
    """The one mapping of errors to statuses (this module's docstring), for this app and the multi-model one."""

    @app.errorhandler(RequestError)
    def request_error(exc: RequestError) -> tuple[Response, int]:
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc)
        return jsonify(error=str(exc)), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        response = jsonify(error=exc.description or exc.name)
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value  # e.g. Allow on a 405
        return response, exc.code or 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("%s %s failed unexpectedly", request.method, request.path)
        return jsonify(error=f"internal error: {type(exc).__name__}"), 500
