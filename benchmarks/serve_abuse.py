"""`visiontune serve` against bad input: every refusal's status code, then a storm, then health.

    python benchmarks/serve_abuse.py [--run runs/serve-hymenoptera | --tiny] [--out runs/serve-abuse.json]
        [--storm 1000] [--quick]

Starts a real `visiontune serve` subprocess (the CLI, on a free port of 127.0.0.1) with
--max-upload-mb 2 and --max-images 4, and sends, one request each: a text file (415), corrupt
bytes behind a JPEG header (415 or 422), a truncated JPEG, an empty file (422), a decompression
bomb (a 30000x30000 1-bit PNG, about 110 KB, refused from its header: 422 within a second), one
image more than --max-images (413), a body 10x over --max-upload-mb declared in Content-Length and
one sent chunked without it (413, raw socket), application/json (415), an unknown model (404),
malformed multipart bodies (400), and a slow client that sends headers and part of its body, then
stalls past the server's 10 s read timeout (408 or the connection closed; a normal request is
answered meanwhile). Then --storm malformed requests in a row (the cases above, in turn), after
which /health must answer 200, a normal predict must work and the server's RSS must have grown by
less than 50 MiB since before the first bad request. Prints a table (case, expected, got, pass),
writes JSON and exits 1 if any check fails.

--run is the lite0 hymenoptera run of serve_load.py (train it there first); --tiny trains a
~0.5M-parameter test model on generated colour images instead (a few seconds).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import select
import socket
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import ROOT, SHARED, Server, _env, _free_port, _machine

MAX_UPLOAD_MB, MAX_IMAGES = 2, 4
READ_TIMEOUT_S = 10  # ServeSettings.read_timeout_s (not a CLI option)
BOUNDARY = "abuseboundary1c7e"


def main() -> int:
    args = _parse()
    if args.quick:
        args.storm = min(args.storm, 100)
    with tempfile.TemporaryDirectory(prefix="serve-abuse-") as tmp:
        run_dir = _tiny_run(Path(tmp)) if args.tiny else (args.run if args.run.is_absolute() else ROOT / args.run)
        if not (run_dir / "summary.json").is_file():
            raise SystemExit(f"{run_dir} is not a finished run: run benchmarks/serve_load.py first, or pass --tiny")
        return _abuse(run_dir, args)


def _abuse(run_dir: Path, args) -> int:
    port = _free_port()
    model = run_dir.name
    jpegs = sorted((args.data / "val").rglob("*.jpg"))
    good = jpegs[0].read_bytes()
    limit = MAX_UPLOAD_MB * 2**20
    cases = _cases(model, good, jpegs, limit)
    command = [sys.executable, "-m", "visiontune.cli.main", "serve", str(run_dir), "--port", str(port),
               "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-images", str(MAX_IMAGES)]
    log_path = args.out.with_suffix(".log")
    rows: list[dict] = []
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": _machine(),
              "server": " ".join(command[1:]), "run": str(run_dir)}

    def check(case: str, expected: str, got, ok: bool, **extra) -> None:
        rows.append({"case": case, "expected": expected, "got": got, "pass": bool(ok), **extra})
        print(f"{'PASS' if ok else 'FAIL'}  {case}: expected {expected}, got {got}", flush=True)

    with Server(command, port, _env(), log_path) as server:
        result["startup_s"] = round(server.wait_ready(), 2)
        status, body, _ = _request(port, "POST", f"/models/{model}/predict", *_multipart([("ok.jpg", "image/jpeg", good)]))
        check("normal predict before", "200", status, status == 200, label=_json(body).get("results", [{}])[0].get("label"))
        rss_before = server.rss_mib()

        for case in cases:
            t0 = time.perf_counter()
            status, body, _ = case["send"](port)
            seconds = time.perf_counter() - t0
            answer = _json(body)
            detail = answer.get("detail", body[:160].decode(errors="replace") if body else "")
            if status == 200:
                detail = f"answered with {len(answer.get('results', []))} result(s)"
            ok = status in case["expected"] and (case.get("extra") is None or case["extra"](detail, seconds))
            check(case["name"], case["expected_text"], status, ok, seconds=round(seconds, 3), detail=str(detail)[:200])

        # The slow client: stalls mid-body; meanwhile a normal request must be answered.
        slow = _slow_client(port, model)
        status, _, _ = _request(port, "POST", f"/models/{model}/predict", *_multipart([("ok.jpg", "image/jpeg", good)]))
        answered_meanwhile = status
        outcome, waited = slow.finish()
        check("slow client (stalls past the read timeout)", f"408 or closed after ~{READ_TIMEOUT_S} s", outcome,
              outcome in ("408", "closed"), seconds=round(waited, 1))
        check("normal predict while a client stalls", "200", answered_meanwhile, answered_meanwhile == 200)

        # The storm: the single cases again, in turn, without pause.
        storm = [c for c in cases if c.get("storm", True)]
        got: Counter = Counter()
        wrong: Counter = Counter()
        t0 = time.perf_counter()
        for i in range(args.storm):
            case = storm[i % len(storm)]
            status, _, _ = case["send"](port)
            got[status] += 1
            if status not in case["expected"]:
                wrong[f"{case['name']} -> {status}"] += 1
        storm_seconds = time.perf_counter() - t0
        check(f"{args.storm} malformed requests in a row", "each as its single case", dict(got) if not wrong else
              dict(wrong), not wrong, seconds=round(storm_seconds, 1), statuses=dict(got))

        status, _, _ = _request(port, "GET", "/health")
        check("/health after the storm", "200", status, status == 200)
        status, body, _ = _request(port, "POST", f"/models/{model}/predict", *_multipart([("ok.jpg", "image/jpeg", good)]))
        check("normal predict after the storm", "200", status, status == 200,
              label=_json(body).get("results", [{}])[0].get("label"))
        rss_after = server.rss_mib()
        check("RSS growth (after - before)", "< 50 MiB", f"{rss_after - rss_before:+.1f} MiB ({rss_before:.0f} -> "
              f"{rss_after:.0f})", rss_after - rss_before < 50, rss_before_mib=rss_before, rss_after_mib=rss_after)
        status, body, _ = _request(port, "GET", "/metrics")
        result["metrics_errors"] = [line for line in body.decode().splitlines()
                                    if line.startswith("visiontune_errors_total")]
        result["metrics_requests"] = [line for line in body.decode().splitlines()
                                      if line.startswith("visiontune_requests_total")]
    check("server stopped cleanly (SIGINT)", "True", server.stopped_cleanly, bool(server.stopped_cleanly))
    result["log_tail"] = log_path.read_text(errors="replace")[-3000:]
    result["rows"] = rows
    result["passed"] = all(r["pass"] for r in rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print("\n| case | expected | got | pass |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['expected']} | {r['got']} | {'PASS' if r['pass'] else 'FAIL'} |")
    print(f"\n{sum(r['pass'] for r in rows)}/{len(rows)} checks passed; wrote {args.out}")
    return 0 if result["passed"] else 1


# -- the cases -------------------------------------------------------------------------------------

def _cases(model: str, good: bytes, jpegs: list[Path], limit: int) -> list[dict]:
    predict = f"/models/{model}/predict"
    rng = random.Random(0)
    corrupt = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(rng.getrandbits(8) for _ in range(4000))
    bomb = _png_bomb(30000, 30000)

    def multipart(parts):
        return lambda port: _request(port, "POST", predict, *_multipart(parts))

    def refused_from_header(detail: str, seconds: float) -> bool:
        return ("max_pixels" in detail or "bomb" in detail) and seconds < 1.0

    cases = [
        ("text file", (415,), multipart([("notes.txt", "text/plain", b"just some text\n" * 20)])),
        ("corrupt bytes behind a JPEG header", (415, 422), multipart([("corrupt.jpg", "image/jpeg", corrupt)])),
        ("truncated JPEG", (422,), multipart([("half.jpg", "image/jpeg", good[:len(good) // 2])])),
        ("empty file", (422,), multipart([("empty.jpg", "image/jpeg", b"")])),
        (f"decompression bomb (30000x30000 1-bit PNG, {len(bomb) // 1024} KB)", (422,),
         multipart([("bomb.png", "image/png", bomb)]), refused_from_header),
        (f"{MAX_IMAGES + 1} images (> --max-images {MAX_IMAGES})", (413,),
         multipart([(f"{i}.jpg", "image/jpeg", jpegs[i].read_bytes()) for i in range(MAX_IMAGES + 1)])),
        ("10x --max-upload-mb, declared Content-Length", (413,), lambda port: _oversize_declared(port, predict, limit)),
        ("10x --max-upload-mb, chunked, no Content-Length", (413,), lambda port: _oversize_chunked(port, predict, limit)),
        ("application/json body", (415,), lambda port: _request(port, "POST", predict, json.dumps({"image": "x"}).encode(),
                                                                 {"Content-Type": "application/json"})),
        ("raw body, image/jpeg type, text bytes", (415,), lambda port: _request(port, "POST", predict, b"hello" * 50,
                                                                                 {"Content-Type": "image/jpeg"})),
        ("unknown model", (404,), lambda port: _request(port, "POST", "/models/no-such-model/predict",
                                                        *_multipart([("ok.jpg", "image/jpeg", good)]))),
        ("multipart without a boundary parameter", (400,),
         lambda port: _request(port, "POST", predict, b"--x\r\n\r\nabc", {"Content-Type": "multipart/form-data"})),
        ("multipart body cut before its closing boundary", (400,),
         lambda port: _request(port, "POST", predict, _multipart([("a.jpg", "image/jpeg", good)])[0][:-200],
                               _multipart([])[1])),
        ("multipart: 2 complete parts, the 3rd cut before the closing boundary", (400,),
         lambda port: _request(port, "POST", predict, _multipart([(f"{i}.jpg", "image/jpeg", jpegs[i].read_bytes())
                                                                  for i in range(3)])[0][:-200], _multipart([])[1])),
        ("multipart part without headers", (400,), lambda port: _request(
            port, "POST", predict, f"--{BOUNDARY}\r\nno colon header\r\n\r\nabc\r\n--{BOUNDARY}--\r\n".encode(),
            _multipart([])[1])),
    ]
    out = []
    for name, expected, send, *extra in cases:
        out.append({"name": name, "expected": expected, "send": send, "extra": extra[0] if extra else None,
                    "expected_text": " or ".join(map(str, expected)) +
                    (", refused from the header in < 1 s" if extra else "")})
    return out


def _png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height, all black: ~110 KB for 30000x30000 (900 Mpx),
    written directly (Pillow would hold the whole canvas, a byte a pixel, to save it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    blocks = [compressor.compress(row * 1000) for _ in range(height // 1000)]
    blocks += [compressor.compress(row * (height % 1000)), compressor.flush()]
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(blocks)) + chunk(b"IEND", b"")


def _multipart(parts: list[tuple[str, str, bytes]]) -> tuple[bytes, dict]:
    body = b""
    for filename, content_type, data in parts:
        body += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{filename}\"\r\n"
                 f"Content-Type: {content_type}\r\n\r\n").encode() + data + b"\r\n"
    body += f"--{BOUNDARY}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


# -- clients ---------------------------------------------------------------------------------------

def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
             timeout: float = 60) -> tuple[int | str, bytes, dict]:
    """One request on a fresh connection: (status, body, headers), or (exception name, b"", {})."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__, b"", {}
    finally:
        connection.close()


def _raw(port: int, head: str, chunks, timeout: float = 30) -> tuple[int | str, bytes, dict]:
    """Send `head`, then the byte strings of `chunks` until the server answers; read the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(head.encode())
        for data in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered (or closed) before the body was sent
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                break
        return _read_response(sock, timeout)
    finally:
        sock.close()


def _read_response(sock: socket.socket, timeout: float) -> tuple[int | str, bytes, dict]:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            block = sock.recv(65536)
            if not block:
                return ("closed", b"", {}) if not data else ("malformed response", data, {})
            data += block
    except ConnectionResetError:
        return ("reset", b"", {}) if not data else ("malformed response", data, {})
    except TimeoutError:
        return "timeout", b"", {}
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    length = int(headers.get("content-length", headers.get("Content-Length", len(body))))
    try:
        while len(body) < length:
            block = sock.recv(65536)
            if not block:
                break
            body += block
    except (ConnectionResetError, TimeoutError):
        pass
    return int(lines[0].split()[1]), body, headers


_PART_HEAD = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\n"
              f"Content-Type: image/jpeg\r\n\r\n").encode()  # a valid start: only the size is wrong


def _oversize_declared(port: int, path: str, limit: int):
    length = 10 * limit
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {length}\r\n\r\n")
    return _raw(port, head, [_PART_HEAD, *(b"\xff" * 65536 for _ in range(length // 65536))])


def _oversize_chunked(port: int, path: str, limit: int):
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n")
    block = b"\xff" * 65536
    chunk = f"{len(block):x}\r\n".encode() + block + b"\r\n"
    first = f"{len(_PART_HEAD):x}\r\n".encode() + _PART_HEAD + b"\r\n"
    chunks = [first] + [chunk] * (10 * limit // len(block)) + [b"0\r\n\r\n"]
    return _raw(port, head, chunks)


class _SlowClient:
    def __init__(self, port: int, model: str) -> None:
        body, headers = _multipart([("slow.jpg", "image/jpeg", b"\xff\xd8" + b"\0" * 100_000)])
        head = (f"POST /models/{model}/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {headers['Content-Type']}"
                f"\r\nContent-Length: {len(body)}\r\n\r\n")
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.sendall(head.encode() + body[:5000])  # then nothing
        self.started = time.perf_counter()

    def finish(self) -> tuple[str, float]:
        """Wait (up to 3x the read timeout) for the server to answer or close: '408', 'closed', ..."""
        try:
            status, _, _ = _read_response(self.sock, 3 * READ_TIMEOUT_S)
        finally:
            self.sock.close()
        return str(status), time.perf_counter() - self.started


def _slow_client(port: int, model: str) -> _SlowClient:
    return _SlowClient(port, model)


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body)
        return value if isinstance(value, dict) else {}
    except (ValueError, TypeError):
        return {}


def _tiny_run(tmp: Path) -> Path:
    """A test_resnet run on generated colour images (the test suite's tiny recipe)."""
    sys.path.insert(0, str(ROOT))
    import visiontune
    from tests.conftest import TINY_OPTIONS, write_class_folders

    data = write_class_folders(tmp / "data", {"blue": 12, "red": 12})
    visiontune.fit(str(data), out=str(tmp / "tiny"), **TINY_OPTIONS)
    return tmp / "tiny"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/serve-hymenoptera"))
    parser.add_argument("--tiny", action="store_true", help="Serve a tiny test model trained on the spot instead.")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "hymenoptera", help="Its val/ JPEGs are sent.")
    parser.add_argument("--storm", type=int, default=1000, help="Malformed requests in a row.")
    parser.add_argument("--out", type=Path, default=Path("runs/serve-abuse.json"))
    parser.add_argument("--quick", action="store_true", help="A storm of 100.")
    args = parser.parse_args()
    if not args.out.is_absolute():
        args.out = ROOT / args.out
    return args


if __name__ == "__main__":
    sys.exit(main())
