"""A schema-driven fuzzer over every route of the real daemon (issue #16). Requests come from
docs/openapi.json (the document the daemon serves; tests/device/serve/test_validation.py checks they are the
same), and every answer must be < 500 or 503 (overloaded / not ready: documented, not a failure),
and every 200 the document gives a schema must match it (tests/support/answers.py).
Afterwards every daemon must still answer a request.

Per operation, three kinds of request:
  coverage   schemathesis' coverage cases: each bound and its neighbours, each field with a wrong
             type, required fields missing, unexpected methods (deterministic by construction)
  generated  hypothesis strategies from the schema, schema-valid and schema-invalid
  extreme    a schema-valid body with one value replaced by what breaks parsers rather than
             validators: 1e-320, 10**400, NaN/Infinity literals, 5000-digit integers, nesting
             5000 deep, lone surrogates, 200 kB strings (EXTREMES)

Three daemons, each on TCP with a bearer token (the fuzz speaks plain HTTP, nothing more):
  decoder  the tiny Llama bundle: OpenAI text routes, KServe metadata, bench, status, metrics
  encoder  the tiny BERT bundle: /v1/embeddings and /v2/models/{m}/infer
  store    `toolkit serve --store` on an empty store: the deploy routes

Reproducible: hypothesis runs derandomized (a fixed seed per test function), no example database,
no shrinking, and without its pool of literals harvested from whatever modules the session
loaded (`no_local_constants`), so the same requests go out on every run, alone or in the suite.
Valid-but-costly numbers are tamed before sending (`tame`): max_tokens and the bench's rounds and
lengths are cut to small values, so the budget goes to variety and not to decoding; values past
the real bounds are left as they are, so the 400 paths still run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from answers import answer_problem
from daemon_fixtures import (  # noqa: F401 - fixtures
    REPO,
    Daemon,
    free_port,
    llama_bundle,
    short_socket_dir,
    start_daemon,
)

schemathesis = pytest.importorskip("schemathesis")
import requests  # noqa: E402 - schemathesis' own HTTP client
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

DOC = json.loads((REPO / "docs" / "openapi.json").read_text())
EXTREME_EXAMPLES = 100  # per operation with a JSON body: one extreme value in a valid body
EXAMPLES = 20  # per operation and per mode (schema-valid, schema-invalid)
TOKEN = "fuzz-token-Qm4vX9kL2pR7wT3z"  # 22+ characters, as the daemon requires
IMPLEMENTED = {"GET", "HEAD", "POST", "PUT", "DELETE"}  # the Handler's do_<METHOD>s
# the seven routes that need a store daemon; the rest go to the decoder (and the encoder for two)
DEPLOY = "/v1/deploy/"
ENCODER_ROUTES = ("/v1/embeddings", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")


@dataclass
class Tally:
    """Every request sent and every answer outside the contract."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    schema_bad: list[str] = field(default_factory=list)  # 200/202s unlike their documented schema
    unknown_methods: set[str] = field(default_factory=set)


def tame(body: Any) -> Any:
    """Cut valid-but-costly numbers to small ones (values beyond the real bounds stay: they
    are 400s, and cheap)."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    caps = {"max_tokens": (4, 1 << 20), "max_completion_tokens": (4, 1 << 20), "runs": (1, 1000),
            "warmup": (0, 1000), "gen_len": (2, 1 << 20)}
    for key, (cap, real_max) in caps.items():
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and cap < v <= real_max:
            body[key] = cap
    for key, cap in (("prompt_lens", 8), ("concurrency", 2)):
        v = body.get(key)
        if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            small = sorted({min(max(x, 1), cap) if 0 < x <= 1 << 20 else x for x in v[:16]})
            body[key] = small[:2] if len(v) <= 16 else v
    return body


def fuzz_document(model: str) -> dict[str, Any]:
    """The published document, with {name} pinned to the served model so that valid requests
    reach the handlers (schema-invalid ones still try other names)."""
    doc = copy.deepcopy(DOC)
    del doc["security"]  # the token is sent as a fixed header: no wrong-token cases (they are 401s)
    for item in doc["paths"].values():
        for op in item.values():
            for p in op.get("parameters", []):
                if p["name"] == "name":
                    p["schema"] = {"enum": [model]}
                elif p["name"] == "version":
                    p["schema"] = {"enum": ["1"]}
    return doc


def fuzz(schema: Any, base_url: str, select: Callable[[str], bool], tally: Tally) -> None:
    """Per operation: schemathesis' coverage cases (every bound and its neighbours, each field
    with a wrong type, missing required ones: deterministic), then hypothesis-generated
    schema-valid and schema-invalid requests."""
    from schemathesis import GenerationMode

    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    for result in schema.get_all_operations():
        op = result.ok()
        if not select(op.path):
            continue
        for case in schema.iter_coverage_cases(op, generation_modes=modes,
                                               generation_config=schema.config.generation):
            send(op, case, base_url, tally)
        for mode in modes:
            run_operation(op, mode, base_url, tally)
        if op.body and "application/json" in [b.media_type for b in op.body]:
            run_extremes(op, base_url, tally)


# --- extreme values ------------------------------------------------------------------------------
# Schema-invalid generation picks values just past a bound or of another type; what breaks parsers
# is further out: numbers that overflow or underflow on the way to a float, Python's non-JSON
# literals, integers past int_max_str_digits, nesting past the recursion limit, lone surrogates.
# Each is put in place of one leaf of a schema-valid body (so it reaches the field's parser)
# and sent as raw bytes (requests refuses to serialize NaN).
_RAW = "\x00raw:"  # a leaf whose JSON text is written verbatim
EXTREMES: tuple[Any, ...] = (
    1e-320, 5e-324, -0.0, 1e308, -1e308, 10**400, -(10**400), 2**63, 2**64, -(2**63) - 1,
    _RAW + "NaN", _RAW + "Infinity", _RAW + "-Infinity", _RAW + "1e400", _RAW + "7" * 5000,
    _RAW + "[" * 5000 + "]" * 5000, _RAW + '"\\ud800"', "x" * 200_000, [], {}, None, True, "",
    [[[[[[[[[["deep"]]]]]]]]]], [0] * 10_000,
)


def leaf_paths(value: Any, path: tuple[Any, ...] = (), depth: int = 0) -> list[tuple[Any, ...]]:
    """Every position in a JSON value, the containers included (a list can be replaced too)."""
    out = [path] if path else []
    if depth < 5 and isinstance(value, dict):
        for k, v in value.items():
            out += leaf_paths(v, (*path, k), depth + 1)
    elif depth < 5 and isinstance(value, list):
        for i, v in enumerate(value[:8]):
            out += leaf_paths(v, (*path, i), depth + 1)
    return out


def with_extreme(body: Any, path: tuple[Any, ...], extreme: Any) -> bytes:
    """The body as JSON text with the value at `path` replaced by `extreme`."""
    body = copy.deepcopy(body)
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = extreme
    text = json.dumps(body, allow_nan=True)
    if isinstance(extreme, str) and extreme.startswith(_RAW):
        text = text.replace(json.dumps(extreme), extreme[len(_RAW):], 1)
    return text.encode()


def run_extremes(op: Any, base_url: str, tally: Tally) -> None:
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    @settings(max_examples=EXTREME_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE), pick=st.integers(0, 1 << 16),
           extreme=st.sampled_from(EXTREMES))
    def one(case: Any, pick: int, extreme: Any) -> None:
        body = tame(case.body)
        paths = leaf_paths(body)
        if not isinstance(body, (dict, list)) or not paths:
            return
        raw = with_extreme(body, paths[pick % len(paths)], extreme)
        url = base_url + case.formatted_path
        response = requests.request(case.method.upper(), url, data=raw, timeout=60, params=case.query,
                                    headers={"Authorization": f"Bearer {TOKEN}",
                                             "Content-Type": "application/json"})
        record(tally, op, case.method, response, raw[:300].decode(errors="replace"))

    one()


def record(tally: Tally, op: Any, method: str, response: Any, body: str) -> None:
    tally.sent += 1
    tally.statuses[response.status_code] += 1
    if method.upper() not in IMPLEMENTED:  # OPTIONS, PATCH, TRACE, ...: the router answers 405
        tally.unknown_methods.add(method.upper())
    if response.status_code >= 500 and response.status_code != 503:
        tally.bad.append(f"{response.status_code} {method.upper()} {op.path}: {body[:300]!r} -> "
                         f"{response.text[:300]!r}")
    elif response.status_code in (200, 202) and method.upper() in ("GET", "POST", "PUT"):
        # an answer the document describes is the answer the document describes
        problem = answer_problem(op.path, method, content_type(response), response.content,
                                 response.status_code)
        if problem is not None:
            tally.schema_bad.append(f"{response.status_code} {method.upper()} {op.path}: "
                                    f"{body[:300]!r}: {problem}")


def content_type(response: Any) -> str:
    """requests' headers (the extremes) or schemathesis' (lower-case names, lists of values)."""
    value = response.headers.get("Content-Type") or response.headers.get("content-type") or ""
    return str(value[0] if isinstance(value, list) else value)


def send(op: Any, case: Any, base_url: str, tally: Tally) -> None:
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}
    if isinstance(case.body, dict):
        case.body = tame(case.body)
    response = case.call(base_url=base_url, timeout=60)
    record(tally, op, case.method, response, str(case.body))


def run_operation(op: Any, mode: Any, base_url: str, tally: Tally) -> None:
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def one(case: Any) -> None:
        send(op, case, base_url, tally)

    try:
        one()
    except Unsatisfiable:  # a route with no parameters and no body has no schema-invalid request
        assert mode.value == "negative", op.path


def start_store_daemon(store: Path) -> Daemon:
    sock_dir = short_socket_dir()
    sock, log_path = sock_dir / "d.sock", sock_dir / "daemon.log"
    token_file = sock_dir / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    cmd = [sys.executable, "-m", "toolkit", "serve", "--store", str(store), "--socket", str(sock),
           "--threads", "1", "--tcp", f"127.0.0.1:{port}", "--token-file", str(token_file)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
    daemon = Daemon(proc, sock, log_path, ("127.0.0.1", port), TOKEN)
    from host.client import DaemonClient, DaemonError, Endpoint

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, daemon.log()
        try:
            if DaemonClient(Endpoint.unix(sock), timeout=5).get("/v1/status")["state"] == "empty":
                return daemon
        except DaemonError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the store daemon did not come up:\n{daemon.log()}")


@pytest.fixture
def no_local_constants(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Hypothesis mixes into its draws literals harvested from the project modules loaded at
    the time (hypothesis.internal.conjecture.providers), so the same seed gives other requests
    in a session that imported other modules (this file alone, or the whole suite). Without
    that pool the requests depend on the seed and the schema only. Private API: raising=True
    makes a Hypothesis that moved it fail here, loudly."""
    from hypothesis.internal.conjecture import providers

    monkeypatch.setattr(providers, "_get_local_constants", providers.Constants, raising=True)
    providers.CONSTANTS_CACHE.cache.clear()  # entries computed with the pool
    yield
    providers.CONSTANTS_CACHE.cache.clear()  # and entries computed without it


@pytest.fixture
def fleet(llama_bundle: Path, tiny_bundle: Any, tmp_path: Path) -> Iterator[dict[str, Daemon]]:  # noqa: F811
    started: dict[str, Daemon] = {}
    try:
        started["decoder"] = start_daemon(llama_bundle, "--queue", "8", tcp=True, token=TOKEN)
        started["encoder"] = start_daemon(tiny_bundle("bert"), tcp=True, token=TOKEN)
        started["store"] = start_store_daemon(tmp_path / "store")
        yield started
    finally:
        for d in started.values():
            d.stop()
        shutil.rmtree(tmp_path / "store", ignore_errors=True)


def test_fuzz_every_route_no_5xx_but_503(fleet: dict[str, Daemon], no_local_constants: None,
                                         record_property: Any) -> None:
    tally = Tally()
    t0 = time.monotonic()
    for name, select in (("decoder", lambda p: not p.startswith(DEPLOY) and p not in ENCODER_ROUTES[:1]),
                         ("encoder", lambda p: p in ENCODER_ROUTES),
                         ("store", lambda p: p.startswith(DEPLOY) or p == "/v1/status")):
        d = fleet[name]
        assert d.tcp is not None
        model = d.client().get("/v1/models")["data"][0]["id"] if name != "store" else "none"
        schema = schemathesis.openapi.from_dict(fuzz_document(model))
        fuzz(schema, f"http://{d.tcp[0]}:{d.tcp[1]}", select, tally)
    took = time.monotonic() - t0
    record_property("fuzz_requests", tally.sent)
    print(f"\nfuzz: {tally.sent} requests in {took:.0f} s; statuses {dict(sorted(tally.statuses.items()))}; "
          f"methods without a route {sorted(tally.unknown_methods)} included")
    assert not tally.bad, "\n".join(tally.bad[:20]) + "\n" + "\n".join(
        f"--- {n} log ---\n{d.log()[-3000:]}" for n, d in fleet.items())
    assert not tally.schema_bad, "\n".join(tally.schema_bad[:20])
    # the fuzz reached the handlers: valid requests succeeded, invalid ones were refused
    assert tally.statuses[200] > 50 and tally.statuses[400] > 50, tally.statuses
    # and every daemon still serves
    for name, d in fleet.items():
        assert d.proc.poll() is None, f"{name} exited:\n{d.log()[-3000:]}"
    chat = fleet["decoder"].tcp_client().post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "temperature": 0})
    assert chat["usage"]["completion_tokens"] >= 1
    enc = fleet["encoder"].tcp_client().post("/v1/embeddings", {"input": "hello world"})
    assert len(enc["data"][0]["embedding"]) > 0
    assert fleet["store"].tcp_client().get("/v1/deploy/hello")["protocol"] >= 1
