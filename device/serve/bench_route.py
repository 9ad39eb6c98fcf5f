"""POST /v1/bench: run the benchmark inside the daemon, on the loaded engine, and stream its
progress events back as SSE (`data: {event}` ... `data: [DONE]`), the final one the report.

The network is not what is measured: timings are taken here, around backend steps. The bench
needs the engine to itself (it uses slots 0..max(concurrency)-1), so while it runs the daemon
answers other requests 503 "benchmarking" (with Retry-After), after waiting for in-flight ones
to finish. A client that goes away mid-run stops the bench; the host then rebuilds the partial
report from the events it did receive (host.report.report_from_events).
"""

from __future__ import annotations

import threading
from typing import Any

from bundle.benchreport import BenchConfig
from bundle.errors import ToolkitError
from device.serve.fields import BoolField, FloatField, IntField, bad, is_int
from device.serve.httpd import ClientGone, HTTPError

IDLE_WAIT_S = 60.0
MAX_LIST = 16  # prompt lengths / concurrency levels per bench
MAX_RUNS = 1000

# The settings' types and bounds (the ones that do not depend on the loaded model), for the
# check below and the OpenAPI document; BenchConfig then checks distinctness, and check_fits the
# model's slots and cache, both before the bench starts.
SCALARS = (
    IntField("gen_len", 1, 1 << 20, doc="output tokens per request, exactly"),
    IntField("runs", 1, MAX_RUNS, doc="measured rounds per shape"),
    IntField("warmup", 0, MAX_RUNS, doc="unmeasured rounds per shape"),
    IntField("seed", 0, 2**63 - 1, doc="the synthetic prompts' token ids (numpy wants >= 0)"),
    BoolField("power", doc="sample tegrastats / INA3221 when the device has them"),
    FloatField("sample_interval_s", 0.001, 60.0, 0.05, doc="memory sampling interval"),
)
LISTS = ("prompt_lens", "concurrency")


def settings_schema() -> dict[str, Any]:
    ints = {"type": "array", "minItems": 1, "maxItems": MAX_LIST, "uniqueItems": True,
            "items": {"type": "integer", "minimum": 1, "maximum": 1 << 20}}
    props: dict[str, Any] = {f.name: f.schema() for f in SCALARS}
    props.update({name: {"anyOf": [ints, {"type": "null"}]} for name in LISTS})
    props["stream"] = {"description": "ignored: the bench always streams"}
    return {"type": "object", "properties": props, "additionalProperties": False,
            "description": "bundle.benchreport.BenchConfig; prompt + gen_len must fit the cache "
                           "and concurrency the slots"}


def parse_settings(body: Any) -> BenchConfig:
    if not isinstance(body, dict):
        raise HTTPError(400, "the bench settings must be a JSON object", "invalid_type")
    settings = {k: v for k, v in body.items() if k != "stream"}
    for f in SCALARS:
        f.read(settings)
    for name in LISTS:
        v = settings.get(name)
        if v is not None and not (isinstance(v, list) and 0 < len(v) <= MAX_LIST
                                  and all(is_int(x) and 1 <= x <= 1 << 20 for x in v)):
            raise bad(name, f"expected 1 to {MAX_LIST} positive integers")
    settings = {k: v for k, v in settings.items() if v is not None}
    try:
        return BenchConfig.from_json(settings)
    except (ToolkitError, TypeError, ValueError) as e:
        raise HTTPError(400, f"bad bench settings: {e}", "invalid_request_error") from e


def bench(app: Any, h: Any) -> None:
    from device.runtime.bench import run_bench

    app._decoder()  # ready, and a decoder bundle
    config = parse_settings(h.read_json())
    if max(config.concurrency) > app.runner.backend.slots:
        raise HTTPError(400, f"concurrency {max(config.concurrency)} exceeds the daemon's "
                             f"{app.runner.backend.slots} slots", "invalid_request_error",
                        "concurrency")
    try:  # before the stream starts: a bench that cannot fit is a 400, not an error event
        config.check_fits(app.runner.backend.slots, app.runner.backend.max_seq)
    except ToolkitError as e:
        raise HTTPError(400, f"bad bench settings: {e}", "invalid_request_error") from e
    app.state = "benchmarking"
    try:
        if not app.engine.wait_idle(IDLE_WAIT_S):
            raise HTTPError(503, "requests still running; try the bench again later", "busy",
                            headers={"Retry-After": "5"})
        stream = h.start_sse()
        stop = threading.Event()

        def send(event: dict[str, Any]) -> None:
            try:
                stream.send(event)
            except ClientGone:
                stop.set()
                raise

        try:
            run_bench(app.runner, config, progress=send, stop=stop)
            _release(app)  # before [DONE]: a client that sends its next request on [DONE] got 503
            stream.done()
        except ClientGone:
            pass  # run_bench already returned its partial report; nobody is listening
        except ToolkitError as e:
            _release(app)
            stream.send({"event": "error", "message": str(e)})
            stream.done()
    finally:
        _release(app)


def _release(app: Any) -> None:
    """The engine is the daemon's again (once; a swap or drain meanwhile keeps its own state)."""
    if app.state == "benchmarking":
        app.state = "ready"
