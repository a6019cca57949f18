"""The API's OpenAPI document (`openapi.yaml`, shipped in the package).

It is parsed when first asked for, not at start-up: parsing YAML leaves about 1.5 MB of
freed objects in the process's heap, which every idle sidecar would otherwise carry.
"""

from __future__ import annotations

import functools
from importlib import resources

import yaml

from ..jsonbody import dumps


def openapi_document() -> dict[str, object]:
    text = resources.files("convostore_sidecar").joinpath("openapi.yaml").read_text("utf-8")
    document: dict[str, object] = yaml.safe_load(text)
    return document


@functools.cache
def openapi_json() -> bytes:
    """The document as served on `/v1/openapi.json`."""
    return dumps(openapi_document())
