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

IDLE_WAIT_S = 60.0


def bench(app: Any, h: Any) -> None:
    from device.runtime.bench import run_bench
    from device.serve.httpd import ClientGone, HTTPError

    app._decoder()  # ready, and a decoder bundle
    body = h.read_json()
    settings = {k: v for k, v in body.items() if k != "stream"} if isinstance(body, dict) else {}
    try:
        config = BenchConfig.from_json(settings)
    except (ToolkitError, TypeError, ValueError) as e:
        raise HTTPError(400, f"bad bench settings: {e}", "invalid_request_error") from e
    if max(config.concurrency) > app.runner.backend.slots:
        raise HTTPError(400, f"concurrency {max(config.concurrency)} exceeds the daemon's "
                             f"{app.runner.backend.slots} slots", "invalid_request_error",
                        "concurrency")
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
            stream.done()
        except ClientGone:
            pass  # run_bench already returned its partial report; nobody is listening
        except ToolkitError as e:
            stream.send({"event": "error", "message": str(e)})
            stream.done()
    finally:
        if app.state == "benchmarking":
            app.state = "ready"
