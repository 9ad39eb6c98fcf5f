"""Deploy throughput against the raw link, measured in the same run over the same path.

    python bench/deploy.py [--tcp-mb 128] [--serial-kb 384] [--repeats 3] [--dir /dev/shm]

Rows (each the median of --repeats runs, raw and deploy interleaved so load on the machine hits
both alike):

  tcp loopback          the deploy (HTTP over TCP, 8 MiB chunks, two in flight) against
                        (a) raw: the same bytes from memory to memory over a loopback socket, and
                        (b) raw file->file: read from the host file, written to a device file
                            (what netcat would do), the floor for any deploy;
                        both ends share this machine's cores, so it is CPU-bound.
  tcp 1 Gbit/s          the same through a proxy paced to 125 MB/s, a Jetson's gigabit port;
                        raw is measured through the same proxy.
  serial 921600         a pty pair through a relay that paces each direction to 92160 B/s
                        (921600 baud 8N1); a pty alone does not throttle to its termios speed,
                        so without pacing the "raw" figure would be a memory copy. Raw is the
                        same relay carrying bare bytes.
  serial pty, unpaced   informative: the framed link's own CPU ceiling.

Upload = begin .. last chunk acknowledged (the target: >= 80 % of raw on TCP, >= 70 % on serial,
no injected errors); "with commit" adds the device's verification (SHA-256 of every file), fsync,
rename and switch. The device is a store-only daemon in its own process (smoke test skipped: it
measures the model, not the link). Files live in --dir (tmpfs by default) so a busy disk does
not blur the link.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device.serve.serial_link import open_port  # noqa: E402
from host.pty_relay import SERIAL_BYTES_PER_S, PtyRelay  # noqa: E402

SERVER = """
import sys, threading
from pathlib import Path
from device.store.store import SmokeResult
from device.serve.deploy import serve_store
args = dict(a.split("=", 1) for a in sys.argv[1:])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
token = Path(args["token"]) if "token" in args else None
serve_store(Path(args["store"]), tcp=args.get("tcp"), token_file=token, serial=args.get("serial"),
            baud=int(args.get("baud", 921600)), stop=stop,
            activate=lambda p: SmokeResult(True, "skipped (bench)"), ready=lambda: print("ready", flush=True))
"""

SINK = """
import os, socket, sys
n, out = int(sys.argv[1]), sys.argv[2]
srv = socket.create_server(("127.0.0.1", 0)); print(srv.getsockname()[1], flush=True)
c, _ = srv.accept(); buf = bytearray(4 << 20); mv = memoryview(buf); got = 0
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if out != "-" else None
while got < n:
    k = c.recv_into(mv)
    if not k: break
    if fd is not None: os.write(fd, mv[:k])
    got += k
c.sendall(b"k")
"""

PROXY = """
import socket, sys, threading, time
upstream, rate = int(sys.argv[1]), float(sys.argv[2])
srv = socket.create_server(("127.0.0.1", 0)); print(srv.getsockname()[1], flush=True)
def pipe(a, b, paced):
    nxt = time.monotonic()
    try:
        while d := a.recv(65536):
            if paced:
                now = time.monotonic(); nxt = max(nxt, now - 0.01) + len(d) / rate  # 10 ms of credit
                if nxt > now: time.sleep(nxt - now)
            b.sendall(d)
    except OSError: pass
    for s in (a, b):
        try: s.shutdown(socket.SHUT_RDWR)
        except OSError: pass
while True:
    c, _ = srv.accept(); u = socket.create_connection(("127.0.0.1", upstream))
    for s in (c, u): s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=pipe, args=(c, u, True), daemon=True).start()
    threading.Thread(target=pipe, args=(u, c, False), daemon=True).start()
"""


def make_bundle(root: Path, size: int) -> Path:
    """A valid bundle of `size` bytes of weights (random: nothing compresses), no model to run."""
    from bundle.contract import ENCODER_CONTRACT
    from bundle.manifest import Contract, Manifest, Source, hash_tree
    from targets import load_target

    root.mkdir(parents=True)
    with open(root / "model.onnx.data", "wb") as f:
        left = size
        while left:
            f.write(os.urandom(min(left, 4 << 20)))
            left -= min(left, 4 << 20)
    (root / "model.onnx").write_bytes(os.urandom(4096))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    m = Manifest(kind="encoder", source=Source("bench", f"bench-{size}", str(root)),
                 contract=Contract(ENCODER_CONTRACT, 17), precision="fp32",
                 target=load_target("cpu").record(), max_seq=0, batch=1)
    m.files = hash_tree(root)
    (root / "manifest.json").write_text(m.to_json())
    return root


def bundle_bytes(bundle: Path) -> int:
    return sum(e["bytes"] for e in json.loads((bundle / "manifest.json").read_text())["files"].values())


class Server:
    def __init__(self, work: Path, **args: str) -> None:
        self.store = work / f"store-{time.monotonic_ns()}"
        argv = [f"{k}={v}" for k, v in {"store": str(self.store), **args}.items()]
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     cwd=Path(__file__).resolve().parents[1])
        assert self.proc.stdout and self.proc.stdout.readline().strip() == "ready"

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(30)
        shutil.rmtree(self.store, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(code: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout
    return proc, int(proc.stdout.readline())


def raw_tcp(n: int, rate: float | None, out: str, src: Path | None) -> float:
    """Bytes/s of n bytes over a socket to a sink process (through a proxy paced to `rate`
    bytes/s when given), from memory or from the file `src` (then n is its size); the sink keeps
    them in `out`."""
    n = os.path.getsize(src) if src is not None else n
    sink, sink_port = spawn(SINK, str(n), out)
    proxy = None
    if rate is not None:
        proxy, target = spawn(PROXY, str(sink_port), str(rate))
    else:
        target = sink_port
    s = socket.create_connection(("127.0.0.1", target))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    block = os.urandom(4 << 20)
    t0 = time.perf_counter()
    if src is not None:
        with open(src, "rb") as f:
            while data := f.read(4 << 20):
                s.sendall(data)
    else:
        sent = 0
        while sent < n:
            s.sendall(block[:min(len(block), n - sent)])
            sent += min(len(block), n - sent)
    s.recv(1)
    dt = time.perf_counter() - t0
    s.close()
    sink.wait(30)
    if proxy:
        proxy.kill()
        proxy.wait()
    if out != "-":
        os.unlink(out)
    return n / dt


def deploy_once(bundle: Path, uri: str) -> tuple[float, float]:
    """(upload bytes/s, with-commit bytes/s) of one deploy to a fresh store."""
    from host import deploy as dp

    dp.add_device("bench", uri, replace=True)
    t0 = time.perf_counter()
    r = dp.deploy(bundle, "bench", retries=0)
    total = time.perf_counter() - t0
    assert r.install.ok, r.install.message
    return r.sent_bytes / r.upload_s, r.sent_bytes / total


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def tcp_rows(work: Path, bundle: Path, repeats: int) -> list[Row]:
    n = bundle_bytes(bundle)
    token = work / "token"
    token.write_text("bench\n")
    token.chmod(0o600)
    rows = []
    for label, rate in (("tcp loopback", None), ("tcp 1 Gbit/s (paced)", 125e6)):
        raw, raw_file, up, full = [], [], [], []
        for _ in range(repeats):
            port = free_port()
            server = Server(work, tcp=f"127.0.0.1:{port}", token=str(token))
            proxy = None
            target = port
            if rate:
                proxy, target = spawn(PROXY, str(port), str(rate))
            try:
                u, f = deploy_once(bundle, f"tcp://127.0.0.1:{target}?token-file={token}")
            finally:
                if proxy:
                    proxy.kill()
                    proxy.wait()
                server.close()
            up.append(u)
            full.append(f)
            raw.append(raw_tcp(n, rate, "-", None))
            raw_file.append(raw_tcp(n, rate, str(work / "sink.bin"), bundle / "model.onnx.data"))
        rows.append((label + " vs raw mem->mem", median(raw), median(up), median(full), ">= 0.80"))
        rows.append((label + " vs raw file->file", median(raw_file), median(up), median(full), ">= 0.80"))
    return rows


def raw_serial(relay: PtyRelay, n: int) -> float:
    host = open_port(relay.host_path)
    dev = open_port(relay.device_path)
    got = 0
    done = threading.Event()

    def read() -> None:
        nonlocal got
        while got < n:
            got += len(dev.read(max(1, min(dev.in_waiting, 65536))))
        done.set()

    threading.Thread(target=read, daemon=True).start()
    block = os.urandom(n)
    t0 = time.perf_counter()
    for i in range(0, n, 4096):
        host.write(block[i:i + 4096])
    done.wait(600)
    dt = time.perf_counter() - t0
    host.close()
    dev.close()
    return n / dt


Row = tuple[str, float, float, float, str]  # link, raw B/s, upload B/s, with-commit B/s, target


def serial_rows(work: Path, bundle: Path, baud: int, repeats: int) -> list[Row]:
    n = bundle_bytes(bundle)
    token = work / "serial-token"  # the serial link authenticates with the daemon's token
    token.write_text("bench\n")
    token.chmod(0o600)
    rows = []
    for label, rate, target in ((f"serial {baud} baud (paced pty)", SERIAL_BYTES_PER_S[baud], ">= 0.70"),
                                ("serial pty, unpaced", None, "-")):
        raw, up, full = [], [], []
        for _ in range(repeats):
            with PtyRelay(rate=rate) as relay:
                server = Server(work, serial=relay.device_path, baud=str(baud), token=str(token))
                try:
                    u, f = deploy_once(bundle, f"serial://{relay.host_path}?baud={baud}&token-file={token}")
                finally:
                    server.close()
                up.append(u)
                full.append(f)
            with PtyRelay(rate=rate) as relay:
                raw.append(raw_serial(relay, n))
        rows.append((label, median(raw), median(up), median(full), target))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tcp-mb", type=int, default=128, help="bundle size for the TCP rows")
    ap.add_argument("--serial-kb", type=int, default=384, help="bundle size for the serial rows")
    ap.add_argument("--baud", type=int, default=921600, choices=sorted(SERIAL_BYTES_PER_S))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                    help="where bundles and stores live (default: tmpfs)")
    ap.add_argument("--skip-serial", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deploy-bench-", dir=args.dir))
    os.environ["TOOLKIT_CONFIG_DIR"] = str(work / "config")
    try:
        rows = tcp_rows(work, make_bundle(work / "tcp-bundle", args.tcp_mb << 20), args.repeats)
        if not args.skip_serial:
            rows += serial_rows(work, make_bundle(work / "serial-bundle", args.serial_kb << 10), args.baud,
                                args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ndeploy throughput, median of {args.repeats}; {os.cpu_count()} CPU(s), load "
          f"{os.getloadavg()[0]:.1f}; TCP bundle {args.tcp_mb} MiB, serial bundle {args.serial_kb} KiB\n")
    fmt = "{:<42}{:>12}{:>12}{:>8}{:>14}{:>9}"
    print(fmt.format("link", "raw MB/s", "upload", "ratio", "with commit", "target"))
    show: Callable[[float], str] = lambda v: f"{v / 1e6:.3f}" if v < 1e6 else f"{v / 1e6:.1f}"  # noqa: E731
    for label, raw, up, full, target in rows:
        print(fmt.format(label, show(raw), show(up), f"{up / raw:.2f}", show(full), target))


if __name__ == "__main__":
    main()
