"""`visiontune serve` under load: against offline `predict`, a hand-written FastAPI server and LitServe.

    python benchmarks/serve_load.py [--run runs/serve-hymenoptera] [--requests 2000]
        [--concurrency 1,8,32] [--variants serve,baseline,litserve] [--out runs/serve-load.json] [--quick]

The model is a tf_efficientnet_lite0 run on hymenoptera, trained first with the CLI (shared
weights, 3 epochs of which 2 frozen, a few minutes on 2 cores) when --run has no finished run.
The images are the real JPEGs of hymenoptera's val folder (153); requests cycle through them,
one image per request, as the same pre-encoded multipart body (part "files") for every server.

Everything runs on 127.0.0.1, one server at a time, each a subprocess killed (process group) at
the end of its variant. Measured in one run:

  offline     `run.predict(paths)` in process over val x N (N so that it lasts --offline-seconds),
              the default CPU plan with --threads: images/s, start-up included.
  decompose   in process, median over --decompose-repeats of `ServedClassifier.decode(bytes)` and
              of `ServedClassifier.predict(batch of 1)`: what one request cannot go below.
  serve       `visiontune serve RUN --threads T` (the CLI, ONNX plan, dynamic batching 8 / 2 ms).
  baseline    the server most users write (`_baseline_server` below): FastAPI + uvicorn, an
              `async def` endpoint that decodes with PIL, applies the run's eval transform and calls
              the eager fp32 torch model (`run.load_model()`, inference_mode) once per request.
  litserve    LitServe as the engine (`_LitClassifier` below): a LitAPI around the same
              `ServedClassifier` (same ONNX plan and threads), max_batch_size 8, batch_timeout 2 ms,
              accelerator cpu, one worker. Its request goes through `request.form()` in the API
              process and is pickled across LitServe's queue to the worker, which decodes and
              predicts. `litserve-zmq` is the same with `fast_queue=True` (ZeroMQ), `litserve-json`
              the same with the JPEG base64 in a JSON body.

For each server and concurrency: a warm-up pass (each val image once, checked against its folder
label), then --requests requests from one aiohttp client (closed loop: `concurrency` coroutines,
a connection pool of that size, keep-alive), bounded by --phase-seconds. Reported: req/s, p50,
p95, p99 latency (client side, request sent to body read), non-200 answers by status, the batch
size histogram (visiontune: /metrics before and after, diffed; LitServe: counted in its predict;
baseline: always 1), RSS of the server's process tree before and after, server and client CPU
seconds. The client runs in this process; its CPU time is reported because on 2 cores it competes
with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from fastapi import (  # module level: the baseline's annotations resolve against it
    File,
    UploadFile,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path("/work/shared")
BOUNDARY = "visiontunebenchboundary7d1f"
MAX_BATCH, BATCH_TIMEOUT_MS = 8, 2.0
VARIANTS = ("serve", "baseline", "litserve", "litserve-zmq", "litserve-json")
DEFAULT_VARIANTS = "serve,baseline,litserve,litserve-zmq,litserve-json"
TRAIN_OPTIONS = ["--epochs", "3", "--freeze-epochs", "2", "--augment", "light", "--seed", "0"]


# -- orchestration ---------------------------------------------------------------------------------

def main() -> int:
    args = _parse()
    if args.server:
        return _run_server(args)
    if args.quick:
        args.requests, args.offline_seconds, args.decompose_repeats = min(args.requests, 100), 5.0, 30
        args.phase_seconds = min(args.phase_seconds, 60.0)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    started = time.time()

    run_dir = _ensure_run(args)
    val = sorted((args.data / "val").rglob("*.jpg"))
    images = [(p.parent.name, p.read_bytes()) for p in val]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": _machine(), "load_before": _wait_for_quiet(args),
        "settings": {"requests": args.requests, "concurrency": concurrencies, "threads": args.threads,
                     "max_batch_size": MAX_BATCH, "batch_timeout_ms": BATCH_TIMEOUT_MS, "quick": args.quick,
                     "phase_seconds": args.phase_seconds, "images": len(images),
                     "image_bytes_mean": round(statistics.mean(len(b) for _, b in images)),
                     "client": _client_name()},
        "run": _run_info(run_dir),
    }
    result["decompose"] = _decompose(run_dir, images, args)
    print(f"decompose: decode {result['decompose']['decode_ms_median']:.2f} ms + predict(1) "
          f"{result['decompose']['predict1_ms_median']:.2f} ms", flush=True)
    result["offline"] = _offline(run_dir, val, args)
    print(f"offline predict: {result['offline']['images_per_s']:.1f} images/s", flush=True)
    result["variants"] = {}
    for variant in variants:
        result["variants"][variant] = _variant(variant, run_dir, images, concurrencies, args)
        _write(args.out, result)  # partial results survive a later failure
    result["load_after"] = list(os.getloadavg())
    result["wall_s"] = round(time.time() - started, 1)
    result["targets"] = _targets(result, concurrencies)
    _write(args.out, result)
    print(_tables(result))
    print(f"\nwrote {args.out}")
    return 0


def _ensure_run(args) -> Path:
    run_dir = args.run if args.run.is_absolute() else ROOT / args.run
    if (run_dir / "model.json").is_file() and (run_dir / "summary.json").is_file():
        return run_dir
    if (run_dir / "model.json").is_file():
        raise SystemExit(f"{run_dir} holds an unfinished run (no summary.json); remove it or give another --run")
    command = [sys.executable, "-m", "visiontune.cli.main", "train", str(args.data), "--model", "tf_efficientnet_lite0",
               "--weights", str(args.weights), "--out", str(run_dir), *TRAIN_OPTIONS]
    print("training:", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, env=_env())
    return run_dir


def _run_info(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    meta = json.loads((run_dir / "model.json").read_text())
    return {"dir": str(run_dir), "model": meta.get("model"), "train_command_options": TRAIN_OPTIONS,
            "val": summary.get("val"), "test": summary.get("test")}


def _variant(variant: str, run_dir: Path, images, concurrencies, args) -> dict:
    port = _free_port()
    fmt = "json" if variant == "litserve-json" else "multipart"
    if variant == "serve":
        command = [sys.executable, "-m", "visiontune.cli.main", "serve", str(run_dir), "--port", str(port),
                   "--threads", str(args.threads), "--max-batch-size", str(MAX_BATCH),
                   "--batch-timeout-ms", str(BATCH_TIMEOUT_MS), "--max-queue", "1024"]
        path = f"/models/{run_dir.name}/predict"
    else:
        kind = "baseline" if variant == "baseline" else "litserve"
        command = [sys.executable, __file__, "--server", kind, "--run", str(run_dir), "--port", str(port),
                   "--threads", str(args.threads)]
        if variant == "litserve-zmq":
            command.append("--fast-queue")
        path = "/predict"
    batch_log = Path(args.out).with_suffix(f".{variant}.batches.json")
    batch_log.unlink(missing_ok=True)
    env = _env() | {"SERVE_LOAD_BATCH_LOG": str(batch_log)}
    log_path = Path(args.out).with_suffix(f".{variant}.log")
    bodies = [_body(data, fmt) for _, data in images]
    content_type = "application/json" if fmt == "json" else f"multipart/form-data; boundary={BOUNDARY}"
    url = f"http://127.0.0.1:{port}{path}"
    out = {"command": " ".join(command[1:]), "request_format": fmt, "phases": {}}
    print(f"\n== {variant}: starting on port {port}", flush=True)
    with Server(command, port, env, log_path) as server:
        out["startup_s"] = round(server.wait_ready(), 2)
        out["rss_ready_mib"] = server.rss_mib()
        for c in concurrencies:
            warm = _arun(_load(url, bodies, content_type, len(bodies), c, args.phase_seconds, collect=True))
            answers = [json.loads(b) if b else {} for b in warm.pop("bodies")]
            answered = sum(bool(body) for body in answers)  # the warm-up is bounded by --phase-seconds too
            correct = sum(_label_of(body) == label for body, (label, _) in zip(answers, images) if body)
            before = _phase_snapshot(server, port, variant, batch_log)
            load = _arun(_load(url, bodies, content_type, args.requests, c, args.phase_seconds))
            after = _phase_snapshot(server, port, variant, batch_log)
            phase = load | {
                "warmup_answered": answered, "warmup_accuracy": correct / answered if answered else None,
                "warmup_errors": warm["errors"],
                "batch_histogram": _diff_hist(before["batches"], after["batches"], variant == "serve")
                if variant != "baseline" else {"1": load["ok"]},
                "rss_before_mib": before["rss"], "rss_after_mib": after["rss"],
                "server_cpu_s": round(after["cpu"] - before["cpu"], 2), "load_before": before["load"],
                **_others(before["machine"], after["machine"], after["cpu"] - before["cpu"] + load["client_cpu_s"]),
                "server_status_counts": _diff_counts(before.get("statuses"), after.get("statuses")),
            }
            phase["mean_batch"] = _mean_batch(phase["batch_histogram"])
            out["phases"][str(c)] = phase
            print(f"   c={c:<3} {phase['req_per_s']:7.1f} req/s  p50 {_ms(phase['p50_ms'])}  p95 {_ms(phase['p95_ms'])}"
                  f"  p99 {_ms(phase['p99_ms'])} ms  errors {phase['errors'] or 0}  batches {phase['batch_histogram']}"
                  f"  rss {before['rss']:.0f}->{after['rss']:.0f} MiB  warm-up acc {correct}/{answered}",
                  flush=True)
        out["rss_end_mib"] = server.rss_mib()
    out["stopped_cleanly"] = server.stopped_cleanly
    out["log_tail"] = log_path.read_text(errors="replace")[-2000:] if log_path.is_file() else ""
    return out


def _machine_cpu() -> dict[str, float]:
    """Seconds of CPU time of the whole machine (all processes, every core) from /proc/stat:
    busy (user+nice+system+irq+softirq) and steal (taken by the hypervisor)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return {"busy": (user + nice + system + irq + softirq) / ticks, "steal": steal / ticks}


def _others(machine_before: dict, machine_after: dict, own_cpu_s: float) -> dict:
    busy = machine_after["busy"] - machine_before["busy"]
    return {"machine_busy_cpu_s": round(busy, 2), "steal_s": round(machine_after["steal"] - machine_before["steal"], 2),
            "others_cpu_s": round(busy - own_cpu_s, 2)}


def _phase_snapshot(server: Server, port: int, variant: str, batch_log: Path) -> dict:
    snap = {"rss": server.rss_mib(), "cpu": server.cpu_seconds(), "machine": _machine_cpu(),
            "load": list(os.getloadavg())}
    if variant == "serve":
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        snap["batches"] = {le: v for le, v in _prom(text, "visiontune_batch_size_bucket", "le").items()}
        snap["statuses"] = _prom(text, "visiontune_requests_total", "status")
    elif variant.startswith("litserve"):
        time.sleep(0.2)
        snap["batches"] = json.loads(batch_log.read_text()) if batch_log.is_file() else {}
    else:
        snap["batches"] = {}
    return snap


def _prom(text: str, metric: str, label: str) -> dict[str, float]:
    """{label value: sample value} of one metric in Prometheus text (summed over other labels)."""
    values: Counter = Counter()
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            match = re.search(rf'{label}="([^"]*)"', line)
            if match:
                values[match.group(1)] += float(line.rsplit(" ", 1)[1])
    return dict(values)


def _diff_hist(before: dict, after: dict, cumulative: bool) -> dict[str, int]:
    """Images-per-forward counts in the phase. `cumulative`: Prometheus buckets (le -> count of
    sizes <= le) become per-range counts ("1", "2", "3-4", "5-8", ...); else exact sizes."""
    if cumulative:
        bounds = sorted((float(k), k) for k in after if k != "+Inf")
        out, previous_count, previous_bound = {}, 0.0, 0
        for bound, key in bounds:
            count_to_here = after[key] - before.get(key, 0.0)
            count = count_to_here - previous_count
            if count:
                low = previous_bound + 1
                out[str(int(bound)) if low == int(bound) else f"{low}-{int(bound)}"] = int(count)
            previous_count, previous_bound = count_to_here, int(bound)
        return out
    sizes = sorted(set(before) | set(after), key=int)
    return {k: int(after.get(k, 0) - before.get(k, 0)) for k in sizes if after.get(k, 0) - before.get(k, 0)}


def _diff_counts(before: dict | None, after: dict | None) -> dict | None:
    if after is None:
        return None
    return {k: int(v - (before or {}).get(k, 0)) for k, v in after.items() if v - (before or {}).get(k, 0)}


def _mean_batch(hist: dict[str, int]) -> float | None:
    """Exact for exact sizes; for a range bucket, its midpoint."""
    total = sum(hist.values())
    if not total:
        return None
    def size(key: str) -> float:
        low, _, high = key.partition("-")
        return (float(low) + float(high or low)) / 2
    return round(sum(size(k) * n for k, n in hist.items()) / total, 2)


def _label_of(body: dict) -> str | None:
    if body.get("results"):  # visiontune serve
        return body["results"][0].get("label")
    return body.get("label")


# -- the load client -------------------------------------------------------------------------------

def _client_name() -> str:
    import aiohttp
    try:
        import uvloop  # noqa: F401
        return f"aiohttp {aiohttp.__version__} on uvloop"
    except ImportError:
        return f"aiohttp {aiohttp.__version__} on asyncio"


def _body(data: bytes, fmt: str) -> bytes:
    if fmt == "json":
        return json.dumps({"image": base64.b64encode(data).decode("ascii")}).encode()
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"image.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


async def _load(url: str, bodies: list[bytes], content_type: str, n: int, concurrency: int, max_seconds: float,
                collect: bool = False) -> dict:
    """`n` requests (body i % len(bodies)) from `concurrency` coroutines over one keep-alive pool."""
    import aiohttp

    latencies: list[float] = []
    statuses: Counter = Counter()
    collected: list[bytes] = [b""] * (n if collect else 0)
    issued = 0
    deadline = time.perf_counter() + max_seconds
    headers = {"Content-Type": content_type}
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=120)
    cpu_before = _self_cpu()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def worker() -> None:
            nonlocal issued
            while issued < n and time.perf_counter() < deadline:
                i = issued
                issued += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as response:
                        body = await response.read()
                        status = response.status
                except Exception as exc:  # noqa: BLE001 - counted as an error of its kind
                    body, status = b"", type(exc).__name__
                latency = time.perf_counter() - t0
                statuses[str(status)] += 1
                if status == 200:
                    latencies.append(latency)
                    if collect:
                        collected[i] = body

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    client_cpu = _self_cpu() - cpu_before
    ok = statuses.get("200", 0)
    lat = sorted(latencies)
    out = {
        "requests": issued, "ok": ok, "seconds": round(elapsed, 3), "req_per_s": ok / elapsed if elapsed else 0.0,
        "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "p99_ms": _pct(lat, 99),
        "mean_ms": 1000 * statistics.mean(lat) if lat else None, "max_ms": 1000 * lat[-1] if lat else None,
        "errors": {k: v for k, v in statuses.items() if k != "200"},
        "cut_by_time": issued < n, "client_cpu_s": round(client_cpu, 2),
    }
    if collect:
        out["bodies"] = collected
    return out


def _arun(coroutine):
    """Run on uvloop where it is installed (a lighter client), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def _pct(sorted_seconds: list[float], q: float) -> float | None:
    if not sorted_seconds:
        return None
    k = (len(sorted_seconds) - 1) * q / 100
    low, high = math.floor(k), math.ceil(k)
    value = sorted_seconds[low] + (sorted_seconds[high] - sorted_seconds[low]) * (k - low)
    return 1000 * value


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu() -> float:
    """Finished child processes (offline predict's decode workers, once joined)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- in-process measurements -----------------------------------------------------------------------

def _decompose(run_dir: Path, images, args) -> dict:
    """Median decode and batch-of-1 predict of ServedClassifier, the server's own two steps."""
    import torch

    from visiontune.serve.models import ServedClassifier

    served = ServedClassifier("decompose", run_dir, device="cpu", max_batch_size=MAX_BATCH, threads=args.threads)
    served.warm_up((1, MAX_BATCH))
    decode, predict, total = [], [], []
    machine, own, load = _machine_cpu(), _self_cpu(), list(os.getloadavg())
    for i in range(args.decompose_repeats):
        data = images[i % len(images)][1]
        t0 = time.perf_counter()
        decoded = served.decode(data)
        t1 = time.perf_counter()
        served.predict(decoded.tensor.unsqueeze(0))
        t2 = time.perf_counter()
        decode.append(t1 - t0)
        predict.append(t2 - t1)
        total.append(t2 - t0)
    out = {"repeats": args.decompose_repeats, "plan": served.plan.describe(), "torch_threads": torch.get_num_threads(),
           "decode_ms_median": 1000 * statistics.median(decode), "predict1_ms_median": 1000 * statistics.median(predict),
           "sum_of_medians_ms": 1000 * (statistics.median(decode) + statistics.median(predict)),
           "median_of_sums_ms": 1000 * statistics.median(total), "load_before": load,
           **_others(machine, _machine_cpu(), _self_cpu() - own)}
    del served
    gc.collect()
    return out


def _offline(run_dir: Path, val: list[Path], args) -> dict:
    """`visiontune predict` through the API: images/s over val x N, start-up included."""
    import visiontune
    from visiontune.inference.engine import plan_inference

    run = visiontune.load_run(run_dir)
    paths = [str(p) for p in val]
    run.predict(paths[:16], threads=args.threads)  # ONNX export (cached in the run) and first session
    t0 = time.perf_counter()
    rows = run.predict(paths, threads=args.threads).rows
    rate = len(rows) / (time.perf_counter() - t0)
    repeat = max(1, math.ceil(args.offline_seconds * rate / len(paths)))
    listed = paths * repeat
    machine, own, load = _machine_cpu(), _self_cpu() + _children_cpu(), list(os.getloadavg())
    t0 = time.perf_counter()
    result = run.predict(listed, threads=args.threads)
    seconds = time.perf_counter() - t0
    others = _others(machine, _machine_cpu(), _self_cpu() + _children_cpu() - own)
    truth = {p: Path(p).parent.name for p in paths}
    accuracy = sum(row["label"] == truth[row["path"]] for row in result.rows[:len(paths)]) / len(paths)
    plan = plan_inference("cpu", threads=args.threads)
    out = {"images": len(listed), "repeat": repeat, "seconds": round(seconds, 2),
           "images_per_s": len(result.rows) / seconds, "skipped": len(result.skipped), "val_accuracy": accuracy,
           "plan": plan.describe() + " (decode workers as planned at the time of this call)", "load_before": load,
           **others}
    del run, result
    gc.collect()
    return out


# -- servers ---------------------------------------------------------------------------------------

class Server:
    """A server subprocess in its own process group; stopped (SIGINT, then SIGTERM, then SIGKILL
    to the group) on leaving the `with` block, whatever happened inside."""

    def __init__(self, command: list[str], port: int, env: dict, log_path: Path) -> None:
        self.command, self.port, self.env, self.log_path = command, port, env, log_path
        self.stopped_cleanly = None

    def __enter__(self) -> Server:
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def __exit__(self, *exc) -> None:
        self.stopped_cleanly = self.stop()
        self.log.close()

    def wait_ready(self, timeout: float = 600.0) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"no /health 200 within {timeout:g} s")

    def pids(self) -> list[int]:
        """The server and every descendant (LitServe: its manager, inference worker, API process)."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
            total += int(match.group(1)) if match else 0
        return round(total / 1024, 1)

    def cpu_seconds(self) -> float:
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / ticks

    def stop(self) -> bool:
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            deadline = time.time() + wait  # the leader is gone: give its children the same time
            while _group_alive(pgid) and time.time() < deadline:
                time.sleep(0.2)
            if not _group_alive(pgid):
                return sig == signal.SIGINT
        if _group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _run_server(args) -> int:
    """Child-process entry: `--server baseline|litserve`."""
    if args.server == "baseline":
        import uvicorn
        uvicorn.run(_baseline_app(args.run, args.threads), host="127.0.0.1", port=args.port, access_log=False,
                    log_level="warning")
        return 0
    import litserve as ls

    api = _LitClassifier(str(args.run), args.threads, os.environ.get("SERVE_LOAD_BATCH_LOG"))
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=args.fast_queue)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning", access_log=False,
               num_api_servers=1)
    return 0


def _baseline_app(run_dir, threads: int):
    """What most users write first: decode, transform, one eager forward per request."""
    import torch
    from fastapi import FastAPI
    from PIL import Image

    import visiontune

    torch.set_num_threads(threads)
    run = visiontune.load_run(run_dir)
    model = run.load_model("best").eval()
    transform = run.preprocessing.eval_transform()
    labels = run.labels
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(files: UploadFile = File(...)) -> dict:
        image = Image.open(io.BytesIO(await files.read())).convert("RGB")
        with torch.inference_mode():
            probs = torch.softmax(model(transform(image).unsqueeze(0)), dim=1)[0]
        k = int(probs.argmax())
        return {"label": labels[k], "probability": float(probs[k])}

    return app


def _lit_api_base():
    import litserve as ls
    return ls.LitAPI


class _LitClassifier(_lit_api_base()):
    """LitServe around visiontune's ServedClassifier: the same decode, ONNX plan and threads."""

    def __init__(self, run_dir: str, threads: int, batch_log: str | None) -> None:
        super().__init__(max_batch_size=MAX_BATCH, batch_timeout=BATCH_TIMEOUT_MS / 1000)
        self.run_dir, self.threads, self.batch_log = run_dir, threads, batch_log

    def setup(self, device) -> None:
        from visiontune.serve.models import ServedClassifier

        self.served = ServedClassifier("litserve", Path(self.run_dir), device="cpu", max_batch_size=MAX_BATCH,
                                       threads=self.threads)
        self.served.warm_up((1, MAX_BATCH))
        self.sizes: Counter = Counter()

    def decode_request(self, request):
        if "image" in request:  # JSON, base64
            data = base64.b64decode(request["image"])
        else:  # multipart: a starlette UploadFile pickled across the queue
            data = request["files"].file.read()
        return self.served.decode(data).tensor

    def batch(self, inputs):
        import torch
        return torch.stack(inputs)

    def predict(self, x):
        predictions = self.served.predict(x)
        if self.batch_log:
            self.sizes[str(len(x))] += 1
            tmp = self.batch_log + ".tmp"
            Path(tmp).write_text(json.dumps(self.sizes))
            os.replace(tmp, self.batch_log)
        return predictions

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output) -> dict:
        return output.body


# -- machine, results ------------------------------------------------------------------------------

def _machine() -> dict:
    from visiontune.bench.benchmark import machine

    versions = {}
    for package in ("onnxruntime", "litserve", "uvicorn", "aiohttp"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {**machine(), "python": platform.python_version(), **versions,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def _wait_for_quiet(args) -> dict:
    """Wait (poll every 60 s, up to --wait-quiet minutes) while the 1-minute load is over --max-load."""
    first = os.getloadavg()
    waited = 0.0
    while os.getloadavg()[0] > args.max_load and waited < args.wait_quiet * 60:
        print(f"load {os.getloadavg()[0]:.2f} > {args.max_load}: waiting 60 s", flush=True)
        time.sleep(60)
        waited += 60
    return {"at_start": list(first), "at_measure": list(os.getloadavg()), "waited_s": waited,
            "quiet": os.getloadavg()[0] <= args.max_load}


def _targets(result: dict, concurrencies: list[int]) -> list[dict]:
    targets = []
    serve = result["variants"].get("serve")
    if not serve:
        return targets
    phases = serve["phases"]
    errors = sum(sum(p["errors"].values()) + sum(p["warmup_errors"].values()) for p in phases.values())
    targets.append({"target": "visiontune serve: 0 errors", "value": errors, "pass": errors == 0})
    top = str(max(concurrencies))
    if top in phases:
        offline = result["offline"]["images_per_s"]
        ratio = phases[top]["req_per_s"] / offline
        targets.append({"target": f"serve c={top} throughput >= 0.8x offline predict", "value": round(ratio, 3),
                        "pass": ratio >= 0.8})
        baseline = result["variants"].get("baseline", {}).get("phases", {}).get(top)
        if baseline and baseline["req_per_s"]:
            ratio = phases[top]["req_per_s"] / baseline["req_per_s"]
            targets.append({"target": f"serve c={top} throughput >= 2x hand-written baseline",
                            "value": round(ratio, 3), "pass": ratio >= 2})
    if "1" in phases and phases["1"]["p50_ms"] is not None:
        ratio = phases["1"]["p50_ms"] / result["decompose"]["sum_of_medians_ms"]
        targets.append({"target": "serve c=1 p50 <= 1.3x (decode + one forward)", "value": round(ratio, 3),
                        "pass": ratio <= 1.3})
    for name, variant in result["variants"].items():
        if name.startswith("litserve"):
            for c, p in variant["phases"].items():
                if c in phases and p["ok"] and phases[c]["ok"]:
                    s = phases[c]
                    targets.append({"target": f"serve vs {name} c={c} (info): req/s ratio, p50 ratio, p99 ratio",
                                    "value": [round(s["req_per_s"] / p["req_per_s"], 3),
                                              round(s["p50_ms"] / p["p50_ms"], 3), round(s["p99_ms"] / p["p99_ms"], 3)],
                                    "pass": None})
    return targets


def _tables(result: dict) -> str:
    m, run = result["machine"], result["run"]
    lines = [
        f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; python {m['python']}, torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}, litserve {m['litserve']}, uvicorn {m['uvicorn']}; client "
        f"{result['settings']['client']}",
        f"load average before: {_fmt(result['load_before']['at_measure'])} (start {_fmt(result['load_before']['at_start'])},"
        f" waited {result['load_before']['waited_s']:.0f} s); after: {_fmt(result.get('load_after', []))}",
        f"run: {run['dir']} ({run['model']}); val {_acc(run['val'])}, test {_acc(run['test'])}",
        "",
        f"offline predict: {result['offline']['images_per_s']:.1f} images/s ({result['offline']['images']} images, "
        f"{result['offline']['seconds']} s; {result['offline']['plan']}; others' CPU "
        f"{result['offline']['others_cpu_s']} s)",
        f"decompose ({result['decompose']['repeats']} repeats, {result['decompose']['plan']}): decode "
        f"{result['decompose']['decode_ms_median']:.2f} ms + predict(batch 1) {result['decompose']['predict1_ms_median']:.2f}"
        f" ms = {result['decompose']['sum_of_medians_ms']:.2f} ms (median of sums "
        f"{result['decompose']['median_of_sums_ms']:.2f} ms; others' CPU {result['decompose']['others_cpu_s']} s)",
        "",
        "| variant | conc | req/s | p50 ms | p95 ms | p99 ms | errors | batch sizes (mean) | RSS before->after MiB "
        "| server CPU s | client CPU s | others' CPU s | warm-up acc |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, variant in result["variants"].items():
        for c, p in variant["phases"].items():
            hist = " ".join(f"{k}:{v}" for k, v in p["batch_histogram"].items())
            lines.append(
                f"| {name} | {c} | {p['req_per_s']:.1f} | {_ms(p['p50_ms'])} | {_ms(p['p95_ms'])} | {_ms(p['p99_ms'])} | "
                f"{json.dumps(p['errors']) if p['errors'] else 0}{' (cut by time)' if p['cut_by_time'] else ''} | "
                f"{hist} ({p['mean_batch']}) | {p['rss_before_mib']:.0f}->{p['rss_after_mib']:.0f} | "
                f"{p['server_cpu_s']:.1f} | {p['client_cpu_s']:.1f} | {p['others_cpu_s']:.1f} | "
                f"{'-' if p['warmup_accuracy'] is None else format(p['warmup_accuracy'], '.3f')} |")
    lines += ["", "| target | value | pass |", "| --- | --- | --- |"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['value']} | {'-' if t['pass'] is None else ('PASS' if t['pass'] else 'FAIL')} |")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _acc(split: dict | None) -> str:
    if not split:
        return "-"
    return f"accuracy {split.get('accuracy', split.get('acc', '?'))}" if isinstance(split, dict) else str(split)


def _fmt(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/serve-hymenoptera"),
                        help="The lite0 hymenoptera run (relative to the repository; trained when missing).")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "hymenoptera")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors")
    parser.add_argument("--requests", type=int, default=2000, help="Measured requests per server and concurrency.")
    parser.add_argument("--concurrency", default="1,8,32", help="Comma-separated client concurrencies.")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"Comma-separated, from {', '.join(VARIANTS)}.")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="Inference threads of every variant (ONNX Runtime / torch), and of offline predict.")
    parser.add_argument("--phase-seconds", type=float, default=240.0, help="Upper bound on one measured phase.")
    parser.add_argument("--offline-seconds", type=float, default=20.0, help="Offline predict lasts about this long.")
    parser.add_argument("--decompose-repeats", type=int, default=200)
    parser.add_argument("--max-load", type=float, default=1.5, help="Wait while the 1-minute load is above this.")
    parser.add_argument("--wait-quiet", type=float, default=20.0, help="Minutes to wait for a quiet machine at most.")
    parser.add_argument("--out", type=Path, default=Path("runs/serve-load.json"))
    parser.add_argument("--quick", action="store_true", help="Smoke run: at most 100 requests, short offline pass.")
    parser.add_argument("--server", choices=("baseline", "litserve"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fast-queue", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.out.is_absolute():
        args.out = ROOT / args.out
    return args


if __name__ == "__main__":
    sys.exit(main())
