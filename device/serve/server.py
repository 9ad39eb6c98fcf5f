"""The device daemon: one bundle, served over a Unix socket (and TCP when asked).

    toolkit serve BUNDLE [--socket PATH] [--tcp HOST:PORT --token-file F] [--slots N] [--queue N]
    toolkit serve --store DIR [--serial PORT] ...   (serve the store's active bundle, take deploys)
    python -m toolkit serve BUNDLE ...             (the same command)

Lifecycle (protocols.md §1e, §2.3), one `lifespan`-like function (`serve`) owns it:
  loading    the sockets listen at once; health/ready answers 503 "loading" while the bundle is
             verified and loaded (hashes first, then the runtime)
  ready      requests are admitted: `slots` run, `queue` wait, the rest get 503
  draining   on SIGTERM/SIGINT/SIGHUP: readiness turns 503 and new requests get 503 first, then the
             listeners close and the socket file goes; in-flight requests may finish for
             --drain-timeout seconds, whatever still runs then ends with finish_reason "abort"
  stopped    engine and runtime closed; exit 0

Routes: OpenAI (/v1/models[/{id}], /v1/completions, /v1/chat/completions, /v1/embeddings), KServe v2
(/v2, /v2/health/{live,ready}, /v2/models/{m}[/versions/{v}][/ready|/infer|/generate|
/generate_stream]; v is "1" or the bundle id, 404 otherwise), /metrics,
/v1/status, and llama.cpp-style /health. Error bodies are OpenAI's nested shape everywhere but
under /v2, where they are KServe's flat {"error": "..."} (401 excepted: OpenAI-shaped on every
route). Over TCP every route, health included, needs the bearer token.

With --store (device/store/store.py) the daemon serves the store's active bundle ("empty" until the
first deploy) and mounts the deploy routes /v1/deploy/* (device/serve/deploy.py), also over
--serial. A deploy's install calls `activate`: the new bundle is loaded beside the old one and
smoke-tested, then the engines are swapped and the old one drains in the background; a failure
leaves the old one serving. Where the device's memory cannot hold both (or with --swap cold) the
old one is drained and unloaded first (device/store/swap.py). The store's crash recovery runs before
anything is loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bundle import __version__
from bundle.errors import ToolkitError
from bundle.records import encode
from device.runtime.procmem import mem_available, process_rss
from device.serve import bench_route, kserve, openai_api
from device.serve.config import ServeConfig
from device.serve.httpd import (
    ClientGone,
    Handler,
    HTTPError,
    TCPServer,
    UnixServer,
    cert_fingerprint,
    parse_tcp,
    read_tokens,
    stop_listening,
    tls_context,
)
from device.serve.metrics import Gauge, ServingMetrics
from device.serve.scheduler import RequestRejected
from device.serve.stop_signal import StopOnSignal

log = logging.getLogger("toolkit.daemon")

RESPONSE_FLUSH_S = 5.0  # after the engine is idle, how long handlers may take to send the end


Route = Callable[..., None]


@dataclass(frozen=True)
class BundleFailure:
    """The last bundle that failed to load or smoke-test, for status: which, why (one line),
    and what serves now (None: nothing)."""

    bundle: str
    reason: str
    serving: str | None


def _one_line(e: BaseException) -> str:
    """An exception as one line for status and the host (the traceback goes to the debug log)."""
    if isinstance(e, ToolkitError):
        return e.message.splitlines()[0] if e.message else type(e).__name__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class Daemon:
    """The application: state, the loaded bundle, its engine, and the routes."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        # loading | ready | empty (a store with no bundle yet) | switching (a cold swap) | draining | failed
        self.state = "loading"
        self.runner: Any = None
        self.engine: Any = None
        self.metrics = ServingMetrics()
        self.started = time.time()
        self.manifest_sha256 = ""
        self.failure: BundleFailure | None = None  # the last bundle that failed to load, for status
        self._responses = 0  # requests being answered right now (not idle connections)
        self._responses_lock = threading.Condition()
        self.routes: list[tuple[str, re.Pattern[str], Route]] = [
            ("GET", re.compile(r"/v1/models"), self.models),
            ("GET", re.compile(r"/v1/models/(?P<model>[^/]+)"), self.model_card),
            ("POST", re.compile(r"/v1/completions"), self.completions),
            ("POST", re.compile(r"/v1/chat/completions"), self.chat_completions),
            ("POST", re.compile(r"/v1/embeddings"), self.embeddings),
            ("GET", re.compile(r"/v1/status"), self.status),
            ("POST", re.compile(r"/v1/bench"), lambda h: bench_route.bench(self, h)),
            ("GET", re.compile(r"/metrics"), self.prometheus),
            ("GET", re.compile(r"/openapi\.json"), self.openapi),
            ("GET", re.compile(r"/health/live|/v2/health/live"), self.live),
            ("GET", re.compile(r"/health|/health/ready|/v2/health/ready"), self.ready),
            ("GET", re.compile(r"/v2"), self.server_metadata),
            ("GET", re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"),
             self.model_metadata),
            ("GET", re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/ready"),
             self.model_ready),
            ("POST", re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer"),
             self.infer),
            ("POST", re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/generate"),
             lambda h, name, version: self.generate(h, name, version, stream=False)),
            ("POST", re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                                r"/generate_stream"),
             lambda h, name, version: self.generate(h, name, version, stream=True)),
        ]
        self.deploy: Any = None  # device.serve.deploy.DeployService with --store
        if config.store is not None:
            from device.serve.deploy import DeployService
            from device.store.store import Store

            self.deploy = DeployService(Store.open(config.store), self.activate, self.deploy_info)
            self.routes += self.deploy.routes()

    # -- lifecycle --

    def load(self) -> None:
        """Load what to serve at start-up. With a store, a broken active bundle (damaged on disk,
        an operator this ONNX Runtime lacks, anything that raises) falls back to the previous
        one, recorded in the store (a rollback: the broken one becomes `previous`, so the next
        start does not try it again); if that fails too the daemon stays up, not ready, and
        says why in its status: a restart loop would only fail the same way."""
        cfg = self.config
        path = self.deploy.store.active_path() if self.deploy is not None else cfg.bundle
        if path is None:  # a store nothing was deployed to yet
            self.state = "empty"
            return
        path = Path(path)
        if self.deploy is None:  # `toolkit serve BUNDLE`: nothing to fall back to; its error stops us
            self._install(self._open(path), path)
            return
        self._check_slots(path)
        runner, reason = self._load(path)
        if runner is not None:
            try:
                self._install(runner, path)
                return
            except Exception as e:  # noqa: BLE001 - reported below like a failed load
                log.debug("starting %s failed", path, exc_info=True)
                reason = _one_line(e)
        store = self.deploy.store
        previous = store.previous
        log.error("the active bundle %s failed to load (%s); %s", path.name, reason,
                  f"rolling back to {previous.dir}" if previous else "there is no previous bundle")
        if previous is not None and store.path_of(previous).is_dir():
            fell_back = BundleFailure(path.name, reason, previous.dir)
            try:
                back = store.rollback(lambda p: self.activate(p, fell_back))
            except ToolkitError as e:
                back = None
                log.error("rolling back failed: %s", e.message)
            if back is not None and back.ok:
                return
            why = back.smoke.detail if back is not None and back.smoke else "the rollback was refused"
            reason += f"; the previous bundle {previous.dir} did not load either ({why})"
        self.failure = BundleFailure(path.name, reason, None)
        self.state = "failed"  # up and answering status, not ready: a deploy can still fix it
        log.error("serving nothing: %s", reason)

    def _check_slots(self, path: Path) -> None:
        """The KV cache --slots asks of an ONNX Runtime decoder, checked against this machine's
        free memory before a store's active bundle loads (raises: the daemon stops with the
        flag's error, as `toolkit serve BUNDLE` does). Found only by the load, the flag's error
        was blamed on the bundle: a rollback was tried, and a smaller previous bundle that did
        fit took the deployed one's place in the store. A manifest that does not read is the
        bundle's own failure, which the load reports."""
        from bundle.manifest import read_manifest
        from device.runtime.kvcache import check_kv_fits

        try:
            manifest = read_manifest(path)
            runtime, layout = manifest.target.runtime, manifest.kv_layout()
        except Exception:  # noqa: BLE001 - a broken manifest: _load reports it, with the rollback
            return
        if manifest.kind == "decoder" and runtime != "tensorrt":
            check_kv_fits(layout, self.config.slots or manifest.batch)

    def _load(self, path: Path) -> tuple[Any, str]:
        """(runner, "") or (None, a one-line reason): any exception while loading is a reason
        (ONNX Runtime's errors are not ToolkitErrors); its traceback goes to the debug log."""
        try:
            return self._open(path), ""
        except Exception as e:  # noqa: BLE001 - whatever it is, the bundle cannot serve
            log.debug("loading %s failed", path, exc_info=True)
            return None, _one_line(e)

    def _open(self, path: Path) -> Any:
        """The bundle's runner with the daemon's settings (raises what load_bundle raises)."""
        from device.runtime.runner import load_bundle

        cfg = self.config
        return load_bundle(path, slots=cfg.slots, threads=cfg.threads,
                           rebuild_on_mismatch=cfg.rebuild_on_mismatch, progress=log.info,
                           spin_between_runs=False,  # HTTP threads share the cores
                           ragged=cfg.speculate != "off")  # several rows' drafts in one step

    def _engine(self, runner: Any, path: Path) -> Any:
        from device.serve.embedder import EmbeddingEngine
        from device.serve.scheduler import Scheduler

        cfg = self.config
        if runner.is_decoder:
            if runner.tokenizer is None:
                raise ToolkitError(f"{path} has no tokenizer; the daemon cannot serve text")
            return Scheduler(runner.backend, runner.tokenizer, cfg.queue, self.metrics, cfg.decode_mode,
                             prefix_cache_bytes=cfg.prefix_cache_mb << 20,
                             prefill_chunk=cfg.prefill_chunk,
                             speculate=cfg.speculate, draft_tokens=cfg.draft_limit)
        if runner.manifest.kind == "encoder":
            return EmbeddingEngine(runner.backend, runner.manifest.pooling, cfg.queue, self.metrics)
        raise ToolkitError(f"{path} is a {runner.manifest.kind} bundle; the daemon serves "
                           "decoder and encoder bundles")

    def _install(self, runner: Any, path: Path) -> None:
        """Start serving `runner` (the first bundle, or in place of the current one); on any
        failure the runner is closed and nothing changes."""
        try:
            engine = self._engine(runner, path)
            engine.start()
        except BaseException:
            runner.close()
            raise
        self.runner, self.engine = runner, engine
        self.manifest_sha256 = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
        self.config.bundle = path
        self._add_gauges()
        self.state = "ready"

    def activate(self, path: Path, fell_back: BundleFailure | None = None) -> Any:
        """The store's activate callback (device/store/store.py): load the bundle, smoke-test it and
        serve it, hot or cold (device/store/swap.py). Hot: loaded beside the one being served, then
        swapped; the old engine drains in the background. Cold: the old one is drained and
        unloaded first. Returns a SmokeResult; a failure (any exception) leaves the old bundle
        serving, and is recorded for status. fell_back: the start-up failure this activation
        falls back from, recorded before the bundle serves (status never shows the fallback
        serving without the reason; a test once read it in between)."""
        from device.store.store import SmokeResult

        t0 = time.monotonic()
        if self.state not in ("ready", "empty", "loading", "failed"):
            return SmokeResult(False, f"the daemon is {self.state}")
        if fell_back is not None:
            self.failure = fell_back
        try:
            result = self._activate(Path(path), t0)
        except Exception as e:  # noqa: BLE001 - a bug here must not leave the store switched
            log.debug("activating %s failed", path, exc_info=True)
            result = SmokeResult(False, _one_line(e), time.monotonic() - t0)
        if result.ok:
            self.failure = fell_back
        else:
            self.failure = BundleFailure(Path(path).name, result.detail,
                                         self.config.bundle.name if self.runner is not None
                                         and self.config.bundle else None)
        return result

    def _activate(self, path: Path, t0: float) -> Any:
        from device.store.store import SmokeResult
        from device.store.swap import plan_swap, resident_estimate

        if self.engine is not None:
            try:
                need: int | None = resident_estimate(path)
            except ToolkitError:
                need = None  # load_bundle below says what is wrong with it
            plan = plan_swap(self.config.swap, need, mem_available())
            if plan.mode == "cold":
                return self._cold_swap(path, plan.why, t0)
        runner, smoke = self._load_smoked(path)
        if runner is None:
            return SmokeResult(False, smoke.detail, time.monotonic() - t0)
        old_runner, old_engine = self.runner, self.engine
        try:
            self._install(runner, path)
        except Exception as e:  # noqa: BLE001 - the old engine was not touched: it still serves
            log.debug("starting %s failed", path, exc_info=True)
            return SmokeResult(False, _one_line(e), time.monotonic() - t0)
        if old_engine is not None:
            threading.Thread(target=self._retire, args=(old_runner, old_engine), name="retire",
                             daemon=True).start()
        log.info("now serving %s (%s)", self.model_id, path)
        return SmokeResult(True, smoke.detail, time.monotonic() - t0)

    def _load_smoked(self, path: Path) -> tuple[Any, Any]:
        """(runner, SmokeResult): the bundle loaded and smoke-tested on its backend alone,
        before any engine thread uses it; runner is None (and nothing stays loaded) on failure."""
        from device.store.store import SmokeResult, smoke_runner

        runner, reason = self._load(path)
        if runner is None:
            return None, SmokeResult(False, reason)
        if self.deploy is not None:
            self.deploy.store.enter_phase("smoke")
        try:
            smoke = smoke_runner(runner)
        except Exception as e:  # noqa: BLE001 - smoke_runner reports; this is a last resort
            smoke = SmokeResult(False, _one_line(e))
        if not smoke.ok:
            runner.close()
            return None, smoke
        return runner, smoke

    def _guarded_load(self, path: Path) -> tuple[Any, Any]:
        """_load_smoked, with anything it raises as a failed smoke test: a cold swap has already
        unloaded the served bundle, so it must go on to load the old one again."""
        from device.store.store import SmokeResult

        try:
            return self._load_smoked(path)
        except Exception as e:  # noqa: BLE001 - reported as the reason
            log.debug("loading %s failed", path, exc_info=True)
            return None, SmokeResult(False, _one_line(e))

    def _cold_swap(self, path: Path, why: str, t0: float) -> Any:
        """Drain and unload the served bundle, then load `path`; if it fails, load the old one
        again. Requests get 503 "switching" meanwhile, and only meanwhile: whatever happens
        (an exception included) the state leaves "switching" (ready, or empty/failed with the
        reason in status)."""
        from device.store.store import SmokeResult

        old_path = Path(self.config.bundle) if self.config.bundle else None
        log.warning("cold swap to %s (%s): requests get 503 until it is up", path, why)
        self.state = "switching"
        try:
            self._retire(self.runner, self.engine)  # a request already past the state check meets
            self.runner = self.engine = None         # a draining engine, which answers 503
            runner, smoke = self._guarded_load(path)
            if runner is not None:
                try:
                    self._install(runner, path)
                    log.info("now serving %s (%s), cold swap", self.model_id, path)
                    return SmokeResult(True, f"{smoke.detail} (cold swap: {why})", time.monotonic() - t0)
                except Exception as e:  # noqa: BLE001 - falls back below like a failed load
                    smoke = SmokeResult(False, _one_line(e))
            detail = f"{smoke.detail} (cold swap: {why})"
            back, reason = self._guarded_load(old_path) if old_path else (None, None)
            if back is not None and old_path is not None:
                try:
                    self._install(back, old_path)
                except Exception as e:  # noqa: BLE001 - reported below
                    back = None
                    reason = SmokeResult(False, _one_line(e))
            if back is None:
                log.error("cold swap: the new bundle failed and the previous one %s did not load again "
                          "(%s)", old_path, reason.detail if reason else "none")
                return SmokeResult(False, f"{detail}; the previous bundle did not load again",
                                   time.monotonic() - t0)
            log.warning("cold swap: %s failed; serving %s again", path, old_path)
            return SmokeResult(False, f"{detail}; the previous bundle is loaded again", time.monotonic() - t0)
        finally:
            if self.state == "switching":  # nothing installed: serving nothing, a deploy can fix it
                self.state = "failed" if old_path else "empty"

    def _retire(self, runner: Any, engine: Any) -> None:
        """Drain a swapped-out engine like a SIGTERM would, then free it."""
        engine.begin_drain()
        if not engine.wait_idle(self.config.drain_timeout):
            engine.abort_all()
            engine.wait_idle(RESPONSE_FLUSH_S)
        engine.close()
        runner.close()

    def deploy_info(self) -> dict[str, Any]:
        """The daemon's part of the deploy hello."""
        backend = self.runner.backend.describe() if self.runner is not None else None
        return {"state": self.state, "backend": backend, "serving": self.model_id if self.runner else None}

    def drain(self, timeout: float) -> None:
        """Finish in-flight work (up to timeout), abort the rest, then close the engine."""
        self.state = "draining"
        engine = self.engine
        if engine is not None:
            engine.begin_drain()
            if not engine.wait_idle(timeout):
                log.warning("drain timeout (%.0f s): aborting %d running, %d queued request(s)",
                            timeout, engine.running, engine.waiting)
                engine.abort_all()
                engine.wait_idle(RESPONSE_FLUSH_S)
        with self._responses_lock:  # let handlers write their last chunk
            self._responses_lock.wait_for(lambda: self._responses == 0, RESPONSE_FLUSH_S)
        if engine is not None:
            engine.close()
            self.runner.close()

    def begin_drain(self) -> None:
        self.state = "draining"  # readiness answers 503 from now on
        if self.engine is not None:
            self.engine.begin_drain()

    # -- dispatch --

    def dispatch(self, h: Handler) -> None:
        path, t0 = h.route_path, time.monotonic()
        with self._responses_lock:
            self._responses += 1
        h.response_started, h.status_sent = False, None
        try:
            if not h.authorized():
                raise HTTPError(401, "missing or invalid bearer token (send 'Authorization: Bearer "
                                     "<token>')", "invalid_api_key",
                                headers={"WWW-Authenticate": 'Bearer realm="toolkit"'})
            route, params = self._match(h.command, path)
            route(h, **params)
        except ClientGone:
            log.info("%s %s: client disconnected", h.command, path)
            h.close_connection = True
        except (HTTPError, RequestRejected) as e:
            self._send_error(h, e, path)
        except Exception:  # noqa: BLE001 - a bug answers 500 with a logged traceback; the daemon lives
            log.exception("%s %s failed", h.command, path)
            self._send_error(h, HTTPError(500, "internal error; the daemon log has the details",
                                          "internal_error"), path)
        finally:
            with self._responses_lock:
                self._responses -= 1
                self._responses_lock.notify_all()
            log.info("%s %s %s %.1f ms", h.command, path, getattr(h, "status_sent", "-"),
                     (time.monotonic() - t0) * 1e3)

    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed = []
        for verb, pattern, route in self.routes:
            m = pattern.fullmatch(path)
            if m:
                if verb == method or (verb == "GET" and method == "HEAD"):
                    return route, m.groupdict()
                allowed.append(verb)
        if allowed:
            raise HTTPError(405, f"{method} is not allowed on {path} (use {', '.join(allowed)})",
                            "method_not_allowed", headers={"Allow": ", ".join(allowed)})
        raise HTTPError(404, f"no route {path}", "not_found")

    def _send_error(self, h: Handler, e: HTTPError | RequestRejected, path: str) -> None:
        if getattr(h, "response_started", False):  # mid-response: all we can do is hang up
            h.close_connection = True
            return
        code = e.code
        if h.command == "POST" and e.status != 401:
            self.metrics.failure.inc(reason=code if e.status >= 500 else "validation")
        headers = dict(e.headers) if isinstance(e, HTTPError) else {}
        if e.retry_after:
            headers["Retry-After"] = str(e.retry_after)
        # KServe's flat body under /v2, OpenAI's nested one elsewhere; a 401 is OpenAI-shaped on
        # every route (llama-server's authentication_error), whatever the client spoke
        flat = path.startswith("/v2") and e.status != 401
        body = {"error": e.message} if flat else openai_api.openai_error(e.status, e.message, code, e.param)
        if not flat and getattr(e, "extra", None):  # a deploy route's figures (507: bytes needed/free)
            body["error"].update(e.extra)  # type: ignore[union-attr]
        try:
            h.send_json(e.status, body, headers)
        except ClientGone:
            h.close_connection = True

    # -- helpers --

    @property
    def model_id(self) -> str:
        return self.runner.name if self.runner else Path(self.config.bundle or "none").name

    def _require_ready(self) -> None:
        if self.state != "ready":
            raise HTTPError(503, f"the daemon is {self.state}", self.state, headers={"Retry-After": "2"})

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise HTTPError(404, f"model {name!r} is not served here; this daemon serves "
                                 f"{self.model_id!r}", "model_not_found", "model")

    def _decoder(self) -> Any:
        self._require_ready()
        if not self.runner.is_decoder:
            raise HTTPError(400, f"{self.model_id} is an embedding model: use /v1/embeddings or "
                                 "/v2/models/{name}/infer", "wrong_model_kind", "model")
        return self.engine

    def _encoder(self) -> Any:
        self._require_ready()
        if self.runner.is_decoder:
            raise HTTPError(400, f"{self.model_id} is a text-generation model: use "
                                 "/v1/completions or /v1/chat/completions", "wrong_model_kind", "model")
        return self.engine

    # -- OpenAI routes --

    def models(self, h: Handler) -> None:
        h.send_json(200, {"object": "list", "data": [self._card()]})

    def model_card(self, h: Handler, model: str) -> None:
        """OpenAI's retrieve-model: the card of the model served, 404 for any other id."""
        self._require_ready()
        self._check_model(model)
        h.send_json(200, self._card())

    def _card(self) -> dict[str, Any]:
        self._require_ready()
        m = self.runner.manifest
        card = {"id": self.model_id, "object": "model", "created": int(self.started),
                "owned_by": "toolkit", "max_model_len": m.max_seq or None,
                "meta": {"kind": m.kind, "precision": m.precision, "target": m.target.name,
                         "source_sha256": m.source.sha256, "manifest_sha256": self.manifest_sha256,
                         "defaults": {"temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                      "max_tokens": {"completions": 16, "chat": "room left in the cache"}}}}
        return card

    def _generation(self, h: Handler, chat: bool) -> None:
        call = openai_api.parse_generation(h.read_json(), chat)
        self._check_model(call.model)
        engine = self._decoder()
        openai_api.serve_generation(h, engine, self.runner.tokenizer, self.model_id, call)

    def completions(self, h: Handler) -> None:
        self._generation(h, chat=False)

    def chat_completions(self, h: Handler) -> None:
        self._generation(h, chat=True)

    def embeddings(self, h: Handler) -> None:
        body = h.read_json()
        engine, tokenizer, max_len = self._encoder(), self.runner.tokenizer, self._encoder_max_len()
        call = openai_api.parse_embedding(body, max_len)
        self._check_model(call.model)
        result = openai_api.run_embedding(
            h, engine, lambda: openai_api.tokenize_texts(call.inputs, tokenizer, max_len))
        h.send_json(200, openai_api.embedding_response(result, self.model_id, call.encoding))

    def openapi(self, h: Handler) -> None:
        from device.serve.openapi import document_bytes

        h.send_bytes(200, document_bytes(), "application/json")

    def _encoder_max_len(self) -> int:
        arch = self.runner.manifest.architecture
        return arch.dims.max_positions if arch else 512

    # -- KServe v2 routes --

    def live(self, h: Handler) -> None:
        h.send_empty(200)

    def ready(self, h: Handler) -> None:
        if self.state == "ready":
            v2 = h.route_path.startswith("/v2")
            return h.send_empty(200) if v2 else h.send_json(200, {"status": "ok"})
        h.send_json(503, {"error": self.state}, {"Retry-After": "2"})

    def server_metadata(self, h: Handler) -> None:
        h.send_json(200, {"name": "toolkit", "version": __version__,
                          "extensions": ["binary_tensor_data", "generate"]})

    @property
    def bundle_id(self) -> str:
        """The served bundle's version name besides "1": its manifest's SHA-256, 12 hex digits."""
        return self.manifest_sha256[:12]

    def _v2_model(self, name: str, version: str | None = None) -> str:
        """The version to answer with; 404 for another model or another version."""
        if self.runner is None:
            raise HTTPError(503, f"the daemon is {self.state}")
        if name != self.model_id:
            raise HTTPError(404, f"model {name!r} is not served here; this daemon serves {self.model_id!r}")
        if version is not None and version not in ("1", self.bundle_id):
            raise HTTPError(404, f"model {name!r} has no version {version[:64]!r}; it has '1' (also "
                                 f"named {self.bundle_id!r}, its bundle id)")
        return version or "1"

    def model_metadata(self, h: Handler, name: str, version: str | None = None) -> None:
        self._v2_model(name, version)
        arch = self.runner.manifest.architecture
        h.send_json(200, kserve.model_metadata(self.model_id, self.runner.manifest.kind,
                                               arch.dims.hidden if arch else None,
                                               self.runner.backend.kind, ["1", self.bundle_id]))

    def model_ready(self, h: Handler, name: str, version: str | None = None) -> None:
        self._v2_model(name, version)
        h.send_empty(200 if self.state == "ready" else 503)

    def infer(self, h: Handler, name: str, version: str | None = None) -> None:
        from device.serve.kserve_binary import HEADER_LENGTH, binary_response, split_body

        body, tail = split_body(h.read_body(), h.headers.get(HEADER_LENGTH))
        version = self._v2_model(name, version)
        if self.runner.is_decoder:
            raise HTTPError(400, f"{name} is a text-generation model: /infer serves embedding models; "
                                 f"use /v2/models/{name}/generate or /v1/completions")
        engine, tokenizer, max_len = self._encoder(), self.runner.tokenizer, self._encoder_max_len()
        # counts, shapes and lengths against the model's declared input, before any allocation
        call = kserve.parse_infer(body, max_len, tail)
        result = openai_api.run_embedding(
            h, engine, lambda: openai_api.tokenize_texts(list(call.texts), tokenizer, max_len, "text"))
        reply = kserve.infer_response(self.model_id, call, result.embeddings, version)
        if not call.binary:
            return h.send_json(200, reply)
        raw, head = binary_response(reply, {kserve.OUTPUT_NAME: result.embeddings})
        h.send_bytes(200, raw, "application/octet-stream", {HEADER_LENGTH: str(head)})

    def generate(self, h: Handler, name: str, version: str | None, stream: bool) -> None:
        from device.serve.kserve_generate import serve_generate

        body = h.read_json()
        version = self._v2_model(name, version)
        if not self.runner.is_decoder:
            raise HTTPError(400, f"{name} is an embedding model: use /v2/models/{name}/infer")
        engine = self._decoder()
        serve_generate(h, engine, self.runner.tokenizer, self.model_id, version, body, stream)

    # -- status and metrics --

    def status(self, h: Handler) -> None:
        h.send_json(200, self.status_record())

    def status_record(self) -> dict[str, Any]:
        rss, peak_rss = process_rss()
        rec: dict[str, Any] = {"state": self.state, "pid": os.getpid(), "version": __version__,
                               "uptime_s": round(time.time() - self.started, 3),
                               "bundle": {"path": str(Path(self.config.bundle).resolve())
                                          if self.config.bundle else None},
                               "memory": {"rss_bytes": rss, "peak_rss_bytes": peak_rss,
                                          "mem_available_bytes": mem_available()}}
        if self.deploy is not None:
            st = self.deploy.store
            rec["store"] = {"root": str(st.root), "active": st.active and st.active.dir,
                            "previous": st.previous and st.previous.dir}
            job = st.install
            if job is not None and job.state == "running":
                rec["store"]["install"] = {"op": job.op, "phase": job.phase}
        if self.failure is not None:
            rec["failure"] = asdict(self.failure)
        runner, engine = self.runner, self.engine  # one look: a cold swap clears both
        if runner is None or engine is None:
            return rec
        from device.runtime.runner import device_family

        m = runner.manifest
        rec["target"] = {**encode(m.target), "device_family": device_family()}
        rec["backend"] = runner.backend.describe()
        rec["bundle"].update(name=m.name, kind=m.kind, precision=m.precision,
                             source_sha256=m.source.sha256, manifest_sha256=self.manifest_sha256,
                             max_seq=m.max_seq, toolkit_version=m.toolkit_version)
        kv = runner.backend.kv_cache_bytes() if runner.is_decoder else 0
        rec["memory"]["kv_cache_bytes"] = kv
        rec["scheduler"] = {"slots": engine.slots, "running": engine.running, "waiting": engine.waiting,
                            "queue_limit": engine.admission.queue_limit, "decode_mode": engine.decode_mode}
        if runner.is_decoder:
            rec["scheduler"]["draft_tokens"] = engine.draft_tokens
            rec["scheduler"]["draft_steps"] = engine.draft_steps
            rec["scheduler"]["spare_token"] = engine.spare
            rec["scheduler"]["joint_spare"] = engine.joint_spare
            # joint steps only of an even number of token rows (probe_ragged; the tiny int4 model)
            rec["scheduler"]["even_steps"] = engine.even_steps
            rec["scheduler"].update(engine.chunks.describe())
            rec["prefix_cache"] = engine.prefix_cache.status()
        return rec

    def prometheus(self, h: Handler) -> None:
        h.send_bytes(200, self.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")

    def _add_gauges(self) -> None:
        engine, m = self.engine, self.runner.manifest
        capacity = (engine.slots * m.max_seq) if self.runner.is_decoder else 0
        gauges = [
            Gauge("num_requests_running", "Requests holding a KV slot.", lambda: engine.running),
            Gauge("num_requests_waiting", "Requests queued for a slot.", lambda: engine.waiting),
            Gauge("kv_slots_in_use", "KV cache slots held by requests.", lambda: engine.running),
            Gauge("kv_slots_total", "KV cache slots.", lambda: engine.slots),
            Gauge("kv_cache_usage_ratio", "Cache positions holding tokens / all positions (0..1).",
                  lambda: engine.tokens_in_cache() / capacity if capacity else 0.0),
            *self._prefix_gauges(engine),
            Gauge("process_resident_memory_bytes", "Resident set size of the daemon.",
                  lambda: process_rss()[0],
                  prefixed=False),
            Gauge("model_info", "The served bundle (value 1).", lambda: 1,
                  {"model_name": self.model_id, "precision": m.precision,
                   "source_sha256": m.source.sha256 or ""}),
        ]
        self.metrics.set_gauges(gauges)

    def _prefix_gauges(self, engine: Any) -> list[Gauge]:
        if not self.runner.is_decoder:
            return []
        cache = engine.prefix_cache  # the served bundle's: a swap brings a new, empty one
        return [Gauge("prefix_cache_bytes", "Memory held by cached prefix KV rows.", lambda: cache.bytes),
                Gauge("prefix_cache_budget_bytes", "The prefix cache's budget (--prefix-cache-mb).",
                      lambda: cache.budget_bytes),
                Gauge("prefix_cache_entries", "Prefix blocks held.", lambda: cache.entries)]


# --- the process -----------------------------------------------------------------------------

def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(config: ServeConfig) -> int:
    """Run the daemon until SIGTERM/SIGINT/SIGHUP; returns the exit code (0 after a clean drain).

    Under systemd (Type=notify, device/serve/notify.py): STATUS= says what it is doing, READY=1
    goes once the bundle is loaded (or the empty store is open), WATCHDOG=1 only while the
    listeners and the engine work, STOPPING=1 when the drain begins."""
    from device.serve.notify import Notifier, Watchdog

    config.check_machine()
    _setup_logging()
    notifier = Notifier.from_env()
    watchdog = Watchdog(notifier)
    remote = config.tcp or config.serial  # the token file holds TCP's bearer tokens and the serial secret
    tokens = read_tokens(Path(config.token_file)) if remote and config.token_file else None
    tls = tls_context(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
    daemon = Daemon(config)
    unix = UnixServer(config.socket_path, daemon, config.max_connections, config.socket_gid)
    servers: list[Any] = [unix]
    listeners: list[threading.Thread] = []
    stop = threading.Event()
    signals = StopOnSignal(stop)
    try:
        if config.tcp:
            host, port = parse_tcp(config.tcp)
            servers.append(TCPServer(host, port, daemon, tokens or [], tls, config.max_connections))
            if config.tls_cert:
                log.info("TLS certificate %s: pin it with %s", config.tls_cert,
                         cert_fingerprint(config.tls_cert))
        signals.install()  # SIGTERM/SIGINT/SIGHUP set `stop` (restored after the drain below)
        for s in servers:
            listeners.append(threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2},
                                              name=f"listen-{type(s).__name__}", daemon=True))
            listeners[-1].start()
        if config.serial:
            from device.serve.serial_link import open_port
            from device.serve.serial_link import serve as serve_serial

            port = open_port(config.serial, config.serial_baud)
            threading.Thread(target=serve_serial, name="serial", daemon=True,
                             args=(port, daemon.deploy.handle_message, stop,
                                   [t.encode() for t in tokens or []])).start()
        log.info("listening on %s%s%s; loading %s", unix.path,
                 f" and {'tls' if tls else 'tcp'}://{config.tcp}" if config.tcp else "",
                 f" and serial {config.serial}" if config.serial else "", config.bundle or config.store)
        notifier.send(f"STATUS=loading {config.bundle or config.store}")
        daemon.load()
        if daemon.runner is None and daemon.failure is not None:  # bundles there, none would load
            log.warning("up, serving nothing (%s); waiting for a deploy", daemon.failure.reason)
        elif daemon.runner is None:
            log.info("ready: the store %s holds no bundle yet; waiting for a deploy", config.store)
        else:
            log.info("ready: %s (%s, %d slot(s), decode %s, drafts %s)", daemon.model_id,
                     daemon.runner.backend.kind, daemon.engine.slots, daemon.engine.decode_mode,
                     getattr(daemon.engine, "draft_steps", "n/a"))
        status = _status_line(daemon)
        notifier.send("READY=1", f"STATUS={status}")
        while not stop.wait(0.5):
            watchdog.tick(daemon, listeners)
            now = _status_line(daemon) + (f" (unhealthy: {watchdog.last_problem})"
                                          if watchdog.last_problem else "")
            if now != status:  # serving another bundle, switching (a cold swap), empty again
                status = now
                notifier.send(f"STATUS={status}")
        log.info("stopping: draining in-flight requests (up to %.0f s)", config.drain_timeout)
        notifier.send("STOPPING=1", f"STATUS=draining (up to {config.drain_timeout:.0f} s)")
        daemon.begin_drain()
    except BaseException:
        daemon.state = "failed"
        signals.restore()
        raise
    finally:
        stop_listening(servers, listeners)  # new connections are refused from here on
    try:
        daemon.drain(config.drain_timeout)
    finally:
        signals.restore()
    log.info("stopped")
    return 0


def _status_line(daemon: Daemon) -> str:
    """What systemctl status shows: the state and the bundle served."""
    if daemon.state == "ready" and daemon.runner is not None:
        return f"serving {daemon.model_id}"
    if daemon.state == "empty":
        return "ready: no bundle deployed yet"
    return daemon.state
