"""The README's hyperparameter table stays true to the code."""

from __future__ import annotations

import dataclasses
import re

import pytest
from maskrcnn.train.config import Hyperparameters
from support import REPO

pytestmark = pytest.mark.unit

README = REPO / "README.md"


def test_every_hyperparameter_and_its_default_is_in_the_readme() -> None:
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", README.read_text(), flags=re.M))
    for field in dataclasses.fields(Hyperparameters):
        assert field.name in rows, f"README lacks hyperparameter {field.name}"
        default = field.default
        shown = "[" + ", ".join(map(str, default)) + "]" if isinstance(default, tuple) else str(default)
        assert Hyperparameters.from_strings({field.name: rows[field.name]}) == Hyperparameters(), (
            f"README default of {field.name} is {rows[field.name]!r}, code says {shown!r}"
        )
