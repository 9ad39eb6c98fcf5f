"""Raw HTTP exchanges with a test daemon, checked against the 200 answers its OpenAPI document
(docs/openapi.json, device/serve/response_schemas.py) publishes: the JSON body, or each event
of a server-sent stream against the media type's `x-event-data`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from paths import REPO

DOC = json.loads((REPO / "docs" / "openapi.json").read_text())


def exchange(socket_path: Path, method: str, path: str, body: dict[str, Any] | None = None,
             timeout: float = 120, data: bytes | None = None) -> tuple[int, str, bytes]:
    """data: a body sent as it is (a manifest's own bytes, a chunk) instead of JSON of `body`."""
    from host.client import UnixHTTPConnection

    conn = UnixHTTPConnection(socket_path, timeout=timeout)
    try:
        raw = data if data is not None else json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=raw, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def check_answer(route: str, method: str, ctype: str, body: bytes, status: int = 200) -> list[Any]:
    """Validate a success answer (200, or 202 where documented) of the documented `route` (its
    template, e.g. /v1/models/{model}); returns the JSON objects checked (one, or a stream's
    events)."""
    import jsonschema

    operations = DOC["paths"].get(route, {})
    assert method.lower() in operations, \
        f"{method.upper()} {route} answers {status} but the document has no such operation"
    responses = operations[method.lower()]["responses"]
    assert str(status) in responses, f"{method.upper()} {route} answers {status}, not documented"
    content = responses[str(status)].get("content")
    if content is None:  # documented without a body
        assert body == b"", (route, body[:200])
        return []
    media_type = ctype.split(";")[0].strip()
    assert media_type in content, (route, media_type, list(content))
    media = content[media_type]
    if "schema" not in media and "x-event-data" not in media:  # a media type with no schema
        return []
    if media_type == "text/event-stream":
        schema = media["x-event-data"]
        items = [json.loads(line[len("data: "):]) for line in body.decode().splitlines()
                 if line.startswith("data: ") and line != "data: [DONE]"]
        assert items, body
    else:
        schema = media["schema"]
        items = [json.loads(body)]
    for item in items:
        jsonschema.validate(item, {**schema, "components": DOC["components"]})
    return items


def answer_problem(route: str, method: str, ctype: str, body: bytes, status: int = 200) -> str | None:
    """check_answer's verdict as text (None: as documented), for a fuzzer that tallies."""
    import jsonschema

    try:
        check_answer(route, method, ctype, body, status)
    except (AssertionError, ValueError, jsonschema.ValidationError) as e:
        return str(e).splitlines()[0][:300]
    return None


def ask(socket_path: Path, method: str, route: str, body: dict[str, Any] | None = None,
        **names: str) -> list[Any]:
    """One exchange on `route` with its {placeholders} filled from names; it must answer 200
    as documented."""
    status, ctype, raw = exchange(socket_path, method, route.format(**names), body)
    assert status == 200, (route, status, raw[:500])
    return check_answer(route, method, ctype, raw)
