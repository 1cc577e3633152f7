"""The GPU benchmark, one prepared run: raw network per bucket, the engine with 1/2/4 GPU workers,
stream capacity, cold runs. Prints short tables last and writes JSON to ``--out``.

Run on a CUDA machine after ``tools/gpu_bench.sh`` has put onnxruntime-gpu on PYTHONPATH (see
../shared/GPU.md), within about 8 minutes of device time::

    python tools/gpu_bench.py [--out DIR] [--quick] [--budget-s 450] [--precision fp16] [--cuda-graphs]

1. raw: the bench network through the engine's own inference core at every bucket: fp32 binding
   the host arrays (the previous GPU path), fp32 and fp16 with device buffers, each with and
   without CUDA graphs; median of repeated runs after the load's warm-up; load time, execution
   path and any fallback with its reason.
2. engine: the whole engine (8 clients, batch 24, finished 1280x720 JPEGs) with 1, 2 and 4 GPU
   workers on device 0, the bench avatar preloaded on every worker.
3. capacity: ``bench-streams --search`` on the 2-worker engine: the most concurrent real-time streams
   with every stream >= 24.5 frames/s and p99 audio-to-frame latency within 150 ms of the floor.
4. cold runs: each engine's ``health`` after its runs (0 expected: every shape warmed up at load).

Without a GPU the same sections run on the CPU provider, smaller (the demo avatar for the engine
and capacity parts); ``--quick`` is the smallest form, run by the test suite, with the demo
network in the raw part too (the bench network's fp16 conversion has its own tests). A section that would
overrun ``--budget-s`` is skipped and says so.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GFLOP_PER_FRAME = 9.8          # bench network: about 4.9 GMAC per frame
T0 = time.monotonic()


def elapsed() -> float:
    return time.monotonic() - T0


def say(*a) -> None:
    print(f"[{elapsed():6.1f} s]", *a, flush=True)


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except OSError:
        return ""


# -- 1. the raw network ------------------------------------------------------------------------------
def raw_matrix(onnx_path: Path, device: int | None, sizes: tuple[int, ...], repeats: int, cache: Path,
               variants: list[tuple[str, bool, bool]], deadline: float) -> list[dict]:
    """Each variant (precision, device buffers, CUDA graphs) loaded like a worker loads it (warm-up at
    every size, self-check, graphs captured by this thread), then timed at every size."""
    from engine.worker.inference import InferenceCore
    rows = []
    for precision, buffers, graphs in variants:
        label = f"{precision}, {'device buffers' if buffers else 'ring binding'}{', CUDA graphs' if graphs else ''}"
        base = {"precision": precision, "device_buffers": buffers, "cuda_graphs": graphs}
        if elapsed() > deadline:
            rows.append({**base, "skipped": "time budget"})
            say(f"raw {label}: skipped (time budget)")
            continue
        core = InferenceCore(device, buckets=sizes, max_batch=max(sizes), device_buffers=buffers,
                             cuda_graphs=graphs, cache_dir=cache)
        t0 = time.perf_counter()
        m = core.load("bench", onnx_path, precision)       # prepare + install + finish (graph capture) here
        load_s = time.perf_counter() - t0
        say(f"raw {label}: loaded in {load_s:.1f} s, path {m.mode}, fallback {m.fallback or 'none'}")
        rng = np.random.default_rng(0)
        for b in sizes:
            image = rng.random((b, *m.graph.image_shape), np.float32)
            audio = rng.standard_normal((b, *m.graph.audio_shape)).astype(np.float32)
            out = np.empty((b, *m.graph.output_shape), np.float32)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                core.run(m, image, audio, out)
                times.append(time.perf_counter() - t)
            med = float(np.median(times))
            path = m.bucket_modes.get(b, m.mode)
            if path == "cuda_graphs" and b not in m.buffers.captured:
                path = "device_buffers"
            rows.append({**base, "path": path, "batch": b, "median_ms": round(1000 * med, 2),
                         "ms_per_frame": round(1000 * med / b, 3), "fps": round(b / med, 1),
                         "tflops": round(GFLOP_PER_FRAME * b / med / 1000, 2), "load_s": round(load_s, 1),
                         "fallback": m.fallback, "fp16_error": m.fp16_error, "cold_runs": core.cold_runs})
            say("  ", {k: rows[-1][k] for k in ("batch", "median_ms", "fps", "path")})
        del core, m
        gc.collect()
    return rows


# -- 2./3. the engine ---------------------------------------------------------------------------------
class Engine:
    def __init__(self, tmp: Path, models: Path, devices: str, workers: int, compositors: int, extra: str = "") -> None:
        from engine.runtime.config import load_config
        self.path = tmp / f"engine_{workers}.toml"
        self.path.write_text(f'''models_root = "{models}"
[server]
front = "tcp://127.0.0.1:{5600 + workers}"
run_dir = "{tmp / f'run{workers}'}"
instance = "gb{workers}"
[gpu]
devices = {devices}
slots_per_device = {workers}
batch_buckets = [1, 2, 4, 8, 16, 24, 32, 40, 50]
{extra}
[compositor]
processes = {compositors}
[ring]
slots = 4
[streams]
max_streams = 256
[supervision]
ready_timeout_s = 300
''')
        self.cfg = load_config(self.path)
        self.log = tmp / f"engine_{workers}.log"

    def __enter__(self) -> Engine:
        from engine.supervisor.control import control
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "--config", str(self.path), "start"],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 300
        while True:
            st = control(self.cfg, "status", 1.0)
            if st and st["ready"]:
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("engine did not start:\n" + self.log.read_text()[-3000:])
            time.sleep(0.3)

    def health(self) -> dict:
        from engine.client import Client
        with Client(self.cfg.server.front, timeout=30) as c:
            return c.health()

    def __exit__(self, *exc) -> None:
        from engine.supervisor.control import control
        control(self.cfg, "stop", 2.0)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def cold(h: dict) -> dict:
    return {"cold_runs": h["cold_runs"], "cold_shapes": [s for w in h["gpu_workers"] for s in w.get("cold_shapes", [])],
            "provider": h["provider"]}


def engine_runs(tmp: Path, models: Path, avatar: str, devices: str, workers_list: list[int], compositors: int,
                clients: int, batch: int, batches: int, capacity: dict | None, extra: str, deadline: float) -> dict:
    from engine.cli.bench import run_bench
    out: dict = {"throughput": [], "capacity": None}
    for workers in workers_list:
        if elapsed() > deadline:
            out["throughput"].append({"gpu_workers": workers, "skipped": "time budget"})
            say(f"engine with {workers} GPU worker(s): skipped (time budget)")
            continue
        t0 = time.perf_counter()
        with Engine(tmp, models, devices, workers, compositors, f"{extra}\n[models.{avatar}]\npreload = true") as eng:
            start_s = time.perf_counter() - t0
            res = run_bench(eng.cfg.server.front, avatar, batches, batch, clients)
            s = res.summary()
            s.update(gpu_workers=workers, compositors=compositors, avatar=avatar, start_s=round(start_s, 1),
                     **cold(eng.health()))
            out["throughput"].append(s)
            say(f"engine {workers} worker(s):", {k: s[k] for k in ("fps", "inference_ms", "total_ms", "cold_runs")})
            if capacity is not None and workers == capacity["workers"]:
                if elapsed() > capacity["deadline"]:
                    out["capacity"] = {"skipped": "time budget"}
                else:
                    out["capacity"] = stream_capacity(eng, avatar, capacity, deadline)
    return out


def stream_capacity(eng: Engine, avatar: str, opts: dict, deadline: float) -> dict:
    from engine.cli.bench import run_stream_bench, search_capacity

    def measure(n: int) -> dict:
        if elapsed() > deadline:                       # out of time: stop the search (counted as a failure)
            return {"streams": n, "errors": 1, "min_rate_fps": 0.0, "latency_p99_ms": 0.0, "floor_ms": 0.0,
                    "latency_p50_ms": 0.0, "frames": 0, "skipped": "time budget"}
        return run_stream_bench(eng.cfg.server.front, avatar, n, opts["seconds"],
                                processes=min(opts["processes"], n)).summary()

    run_stream_bench(eng.cfg.server.front, avatar, min(4, opts["limit"]), 2.0)      # warm-up, not counted
    best, rows = search_capacity(measure, opts["limit"], opts["start"],
                                 on_row=lambda r: say("  streams", r["streams"], "ok" if r["ok"] else r["why"],
                                                      {k: r.get(k) for k in ("min_rate_fps", "latency_p99_ms")}))
    return {"capacity": best, "avatar": avatar, "seconds": opts["seconds"], "rows": rows, **cold(eng.health())}


# -- report ----------------------------------------------------------------------------------------
def networks(tmp: Path, device: int | None, small: bool, budget: float) -> list[dict]:
    """Many networks of one architecture in one inference core (engine-ctl bench-networks): on CUDA
    10 bench networks with their own session against 100 shared (fp16, the engine's buckets); on
    the CPU (``small``) 2 demo networks, shared."""
    from engine.cli.bench_networks import run_modes, write_networks
    if elapsed() > 0.9 * budget:
        return [{"skipped": "time budget"}]
    rows = []
    plan = [("shared", 2)] if small else [("own", 10), ("shared", 100)]
    for mode, n in plan:
        paths = write_networks(tmp / "networks", n, "demo" if small else "bench")   # quick: the small network
        rows += run_modes(paths, device, "fp32" if device is None else "fp16", 1 if small else 8,
                          "off" if device is None else "auto", 8, tmp / "networks" / "cache", 0, (mode,))
        say(f"networks: {mode} x {n} done")
    return rows


def tables(report: dict) -> str:
    lines = ["", "| precision | asked | path | batch | ms/batch | ms/frame | frames/s | TFLOP/s | load s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["raw"]:
        asked = ("graphs" if r["cuda_graphs"] else "buffers" if r["device_buffers"] else "ring")
        if "skipped" in r:
            lines.append(f"| {r['precision']} | {asked} | skipped: {r['skipped']} | | | | | | |")
            continue
        lines.append(f"| {r['precision']} | {asked} | {r['path']} | {r['batch']} | {r['median_ms']} | "
                     f"{r['ms_per_frame']} | {r['fps']} | {r['tflops']} | {r['load_s']} |")
    fb = {f"{r['precision']}/{'graphs' if r['cuda_graphs'] else 'buffers' if r['device_buffers'] else 'ring'}":
          r["fallback"] for r in report["raw"] if r.get("fallback")}
    errs = {r["precision"]: r["fp16_error"] for r in report["raw"] if r.get("fp16_error")}
    if fb:
        lines.append(f"fallbacks: {json.dumps(fb)}")
    for e in list(errs.values())[:1]:
        lines.append(f"fp16 vs fp32 on the avatar's frames: max |diff| {e.get('max_abs_diff')}, "
                     f"mean {e.get('mean_abs_diff')}, pixels changed {e.get('pixels_changed')}")
    lines += ["", "| GPU workers | clients | batch | frames/s | per client | inference ms | composite ms | total ms | "
                  "cold runs | start s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["engine"]["throughput"]:
        if "skipped" in r:
            lines.append(f"| {r['gpu_workers']} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        lines.append(f"| {r['gpu_workers']} | {r['clients']} | {r['batch_size']} | {r['fps']} | {r['per_client_fps']} | "
                     f"{r['inference_ms']} | {r['composite_ms']} | {r['total_ms']} | {r['cold_runs']} | {r['start_s']} |")
    cap = report["engine"]["capacity"]
    if cap and "rows" in cap:
        lines += ["", "| streams | frames | slowest frames/s | latency p50 ms | latency p99 ms | floor ms | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for r in cap["rows"]:
            lines.append(f"| {r['streams']} | {r.get('frames')} | {r['min_rate_fps']} | {r.get('latency_p50_ms')} | "
                         f"{r['latency_p99_ms']} | {r['floor_ms']} | {'ok' if r['ok'] else r['why']} |")
        lines.append(f"stream capacity ({cap['avatar']}): {cap['capacity']} streams; cold runs after the run: "
                     f"{cap['cold_runs']} {cap['cold_shapes'] or ''}")
    elif cap:
        lines.append(f"stream capacity: skipped ({cap['skipped']})")
    lines += ["", "| networks | mode | precision | resident ms (median) | MB per network | x weights | per GB | "
                  "first request / warm | batch ms by size |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("networks", []):
        if "skipped" in r:
            lines.append(f"| skipped: {r['skipped']} | | | | | | | | |")
            continue
        per_gb = round(1e9 / r["bytes_per_network"], 1) if r["bytes_per_network"] > 0 else None
        lines.append(f"| {r['networks']} | {r['mode']} | {r['precision']} | {r['resident_ms']['median']} | "
                     f"{round(r['bytes_per_network'] / 1e6, 1)} | {r['bytes_vs_weights']} | {per_gb} | "
                     f"{r['first_request_vs_warm']} | {r['run_ms']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out/gpu"))
    ap.add_argument("--quick", action="store_true", help="the smallest matrix (the test suite's CPU run)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip what would start after this many seconds")
    ap.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="the engine runs' precision")
    ap.add_argument("--cuda-graphs", action="store_true", help="the engine runs with gpu.cuda_graphs = true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort
    name = gpu_name()
    if name and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()                 # CUDA and cuDNN from the nvidia pip packages (GPU.md)
        except Exception as e:  # noqa: BLE001
            print("preload_dlls:", e)
    avail = ort.get_available_providers()
    gpu = "CUDAExecutionProvider" in avail and bool(name)
    say(f"onnxruntime {ort.__version__} {avail}; GPU: {name or 'none'}; python {platform.python_version()}; "
        f"{os.cpu_count()} cores")
    from engine.cli.demo_avatars import ensure_avatars
    tmp = Path(tempfile.mkdtemp(prefix="gpubench"))
    try:
        models = tmp / "models"
        raw_net = "demo" if args.quick else "bench"
        ensure_avatars(models, names=tuple(dict.fromkeys(("demo", raw_net))), frames=12 if args.quick else 100)
        say("avatars made")
        onnx_path = models / raw_net / "checkpoint" / "model_best.onnx"
        report: dict = {"date": time.strftime("%Y-%m-%d"), "gpu": name, "onnxruntime": ort.__version__,
                        "cores": os.cpu_count(), "quick": args.quick, "precision": args.precision,
                        "cuda_graphs": args.cuda_graphs}
        budget = args.budget_s
        ncomp = max(2, (os.cpu_count() or 4) - 2)
        extra = f'precision = "{args.precision}"' + ("\ncuda_graphs = true" if args.cuda_graphs else "")
        if gpu:
            report["raw"] = raw_matrix(onnx_path, 0, (1, 2, 4, 8, 16, 24, 32, 40, 50), 10, tmp / "cache",
                                       [("fp32", False, False), ("fp32", True, False), ("fp32", True, True),
                                        ("fp16", True, False), ("fp16", True, True)], 0.35 * budget)
            report["engine"] = engine_runs(tmp, models, "bench", "[0]", [1, 2, 4], ncomp, 8, 24, 10,
                                           {"workers": 2, "limit": 128, "start": 8, "seconds": 5.0, "processes": 4,
                                            "deadline": 0.75 * budget}, extra, budget)
        else:
            quick = args.quick
            report["raw"] = raw_matrix(onnx_path, None, (1, 2) if quick else (1, 2, 4, 8), 2 if quick else 5,
                                       tmp / "cache",
                                       [("fp32", False, False), ("fp32", True, False), ("fp16", False, False)], budget)
            report["engine"] = engine_runs(tmp, models, "demo", "[]", [1, 2], 2, 2, 8, 2 if quick else 5,
                                           {"workers": 1, "limit": 2 if quick else 8, "start": 1,
                                            "seconds": 1.5 if quick else 4.0, "processes": 1, "deadline": budget},
                                           extra, budget)
        report["networks"] = networks(tmp, 0 if gpu else None, args.quick or not gpu, budget)
        report["elapsed_s"] = round(elapsed(), 1)
        (out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    finally:                                   # the engines' logs kept, the avatars and networks (~90 MB) not
        for log in tmp.glob("*.log"):
            (out / log.name).write_text(log.read_text(errors="replace")[-200_000:])
        shutil.rmtree(tmp, ignore_errors=True)
    print(tables(report))
    print(f"\ntotal {report['elapsed_s']} s; JSON in {out / 'gpu_bench.json'}")


if __name__ == "__main__":
    main()
