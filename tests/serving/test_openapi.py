"""The OpenAPI document in the package (maskrcnn/serve/openapi.yaml) against a live server, with schemathesis.

schemathesis generates requests from the document (valid and invalid), sends them to the shared
`serve` fixture and checks every answer: no 5xx, only documented status codes and content types,
bodies that match their schemas. ``positive_data_acceptance`` is excluded: a generated "binary"
body matches the schema without being an image, and the server rightly answers it with a 400.
The examples are derandomized (the same 100 every run): a CI run fails on a change, not on a draw.
"""

from __future__ import annotations

from importlib import resources

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS
from serving_support import Server

pytestmark = pytest.mark.integration

SPEC = resources.files("maskrcnn.serve").joinpath("openapi.yaml")
schema = schemathesis.openapi.from_path(str(SPEC))
EXCLUDED = [check for check in CHECKS.get_all() if check.__name__ == "positive_data_acceptance"]


@schema.parametrize()
@settings(max_examples=100, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_live_server_matches_the_openapi_document(case: schemathesis.Case, server: Server) -> None:
    case.call_and_validate(base_url=f"http://127.0.0.1:{server.port}", excluded_checks=EXCLUDED, timeout=30)
