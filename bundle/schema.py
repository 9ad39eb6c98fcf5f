"""The manifest's JSON Schema, generated from its records (bundle/manifest.py).

    python -m bundle.schema > docs/manifest.schema.json     # tests/bundle/test_bundle.py checks it is current
"""

from __future__ import annotations

import json
from typing import Any

from bundle.manifest import SCHEMA_VERSION, Manifest
from bundle.records import json_schema

SCHEMA_ID = f"https://edge-toolkit.invalid/schemas/manifest-v{SCHEMA_VERSION}.json"


def manifest_schema() -> dict[str, Any]:
    schema = json_schema(Manifest, f"edge-toolkit bundle manifest, schema version {SCHEMA_VERSION}",
                         SCHEMA_ID)
    # the version this schema describes; older manifests are migrated, newer ones refused
    schema["$defs"]["Manifest"]["properties"]["schema_version"] = {"const": SCHEMA_VERSION}
    return schema


def render() -> str:
    return json.dumps(manifest_schema(), indent=2) + "\n"


if __name__ == "__main__":
    print(render(), end="")
