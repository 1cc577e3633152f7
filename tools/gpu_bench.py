"""GPU benchmark matrix: raw ONNX Runtime on the bench network, then the whole engine.

Run on a CUDA machine after ``tools/gpu_bench.sh`` has put onnxruntime-gpu on PYTHONPATH
(see ../shared/GPU.md). Without a GPU it runs the same matrix on the CPU provider (smaller), so
the script itself is tested here. Prints a short table last and writes JSON to ``--out``.

    python tools/gpu_bench.py [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GFLOP_PER_FRAME = 9.8          # bench network: about 4.9 GMAC per frame


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except OSError:
        return ""


def ort_matrix(onnx_path: Path, provider: str, batches: list[int], repeats: int) -> list[dict]:
    import onnxruntime as ort
    from engine.avatar import read_graph
    g = read_graph(onnx_path)
    rows = []
    providers = [(provider, {"device_id": 0}), "CPUExecutionProvider"] if provider != "CPUExecutionProvider" \
        else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(onnx_path), providers=providers)
    assert sess.get_providers()[0] == provider, sess.get_providers()
    for b in batches:
        image = np.random.default_rng(0).random((b, *g.image_shape), np.float32)
        audio = np.random.default_rng(1).standard_normal((b, *g.audio_shape)).astype(np.float32)
        out = np.empty((b, *g.output_shape), np.float32)
        for binding in (False, True):
            def run() -> None:
                if binding:
                    io = sess.io_binding()
                    io.bind_input(g.image_input, "cpu", 0, np.float32, list(image.shape), image.ctypes.data)
                    io.bind_input(g.audio_input, "cpu", 0, np.float32, list(audio.shape), audio.ctypes.data)
                    io.bind_output(g.output, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
                    sess.run_with_iobinding(io)
                else:
                    sess.run([g.output], {g.image_input: image, g.audio_input: audio})
            for _ in range(3):
                run()                                   # warm-up: cuDNN picks its algorithms
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            med = float(np.median(times))
            rows.append({"provider": provider, "batch": b, "io_binding": binding, "median_ms": round(1000 * med, 2),
                         "ms_per_frame": round(1000 * med / b, 3), "fps": round(b / med, 1),
                         "tflops": round(GFLOP_PER_FRAME * b / med / 1000, 2)})
            print(rows[-1], flush=True)
    return rows


def engine_runs(models: Path, devices: str, compositors: int, slots: int, clients_list: list[int], batch: int,
                batches: int, tmp: Path, stream_counts: list[int] = (), stream_seconds: float = 6.0) -> list[dict]:
    from engine.bench import run_bench, run_stream_bench
    from engine.cli import control
    from engine.config import load_config
    rows = []
    for slot_count in sorted({1, slots}) if len(clients_list) > 1 else [slots]:
        cfg_path = tmp / f"engine_{slot_count}.toml"
        cfg_path.write_text(f'''models_root = "{models}"
[server]
front = "tcp://127.0.0.1:{5600 + slot_count}"
run_dir = "{tmp / f'run{slot_count}'}"
instance = "gb{slot_count}"
[gpu]
devices = {devices}
slots_per_device = {slot_count}
[compositor]
processes = {compositors}
[ring]
slots = 4
''')
        cfg = load_config(cfg_path)
        log = open(tmp / f"engine_{slot_count}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "--config", str(cfg_path), "start"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 180
            while True:
                st = control(cfg, "status", 1.0)
                if st and st["ready"]:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("engine did not start:\n" + (tmp / f"engine_{slot_count}.log").read_text()[-3000:])
                time.sleep(0.3)
            provider = st["engine"].get("provider")
            for clients in clients_list:
                res = run_bench(cfg.server.front, "bench", batches, batch, clients)
                s = res.summary()
                s.update(slots_per_device=slot_count, compositors=compositors, provider=provider)
                rows.append(s)
                print(s, flush=True)
            if slot_count == slots:
                for n in stream_counts:
                    r = run_stream_bench(cfg.server.front, "bench", n, stream_seconds).summary()
                    r.update(kind="streams", slots_per_device=slot_count, provider=provider)
                    rows.append(r)
                    print(r, flush=True)
            st = control(cfg, "status", 5.0)
            rows[-1]["rss_mb"] = {f"{p['role']}-{p['idx']}": round(p["rss_bytes"] / 1e6) for p in st["processes"]}
        finally:
            control(cfg, "stop", 2.0)
            proc.wait(60)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out/gpu"))
    ap.add_argument("--quick", action="store_true", help="a small matrix (CPU self-test)")
    ap.add_argument("--streams-only", action="store_true", help="only the stream benchmark")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001
            print("preload_dlls:", e)
    avail = ort.get_available_providers()
    name = gpu_name()
    gpu = "CUDAExecutionProvider" in avail and bool(name)
    print(f"onnxruntime {ort.__version__} {avail}; GPU: {name or 'none'}; python {platform.python_version()}; "
          f"{os.cpu_count()} cores", flush=True)
    from engine.demo_avatars import ensure_avatars
    tmp = Path(tempfile.mkdtemp(prefix="gpubench"))
    models = tmp / "models"
    t0 = time.perf_counter()
    ensure_avatars(models, names=("demo", "bench"), frames=100)
    print(f"avatars made in {time.perf_counter() - t0:.1f} s", flush=True)
    onnx_path = models / "bench" / "checkpoint" / "model_best.onnx"
    report: dict = {"date": time.strftime("%Y-%m-%d"), "gpu": name, "onnxruntime": ort.__version__,
                    "cores": os.cpu_count()}
    if gpu and args.streams_only:
        report["ort"] = []
        ncomp = max(2, (os.cpu_count() or 4) - 2)
        report["engine"] = engine_runs(models, "[0]", ncomp, 2, [8], 24, 5, tmp, [1, 8, 16, 32])
    elif gpu:
        report["ort"] = ort_matrix(onnx_path, "CUDAExecutionProvider", [1, 8, 24, 48], 20)
        ncomp = max(2, (os.cpu_count() or 4) - 2)
        report["engine"] = engine_runs(models, "[0]", ncomp, 2, [1, 2, 4, 8], 24, 10, tmp, [1, 8, 16, 24, 32])
    else:
        report["ort"] = ort_matrix(onnx_path, "CPUExecutionProvider", [1, 8], 2 if args.quick else 5)
        report["engine"] = engine_runs(models, "[]", 2, 1, [1, 2], 8, 2, tmp, [1], 2.0)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    for log in tmp.glob("*.log"):
        (out / log.name).write_text(log.read_text(errors="replace")[-200_000:])
    print("\n| provider | batch | io binding | ms/batch | ms/frame | frames/s | TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for r in report["ort"]:
        print(f"| {r['provider'][:4]} | {r['batch']} | {r['io_binding']} | {r['median_ms']} | {r['ms_per_frame']} | "
              f"{r['fps']} | {r['tflops']} |")
    print("\n| GPU workers | clients | batch | frames/s | per client | inference ms | composite ms | total ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in (r for r in report["engine"] if r.get("kind") != "streams"):
        print(f"| {r['slots_per_device']} | {r['clients']} | {r['batch_size']} | {r['fps']} | {r['per_client_fps']} | "
              f"{r['inference_ms']} | {r['composite_ms']} | {r['total_ms']} |")
    print("\n| streams | frames | min frames/s | first frame ms | latency p50 | latency p99 | late p99 | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in (r for r in report["engine"] if r.get("kind") == "streams"):
        print(f"| {r['streams']} | {r['frames']} | {r['min_rate_fps']} | {r['first_frame_ms_max']} | "
              f"{r['latency_p50_ms']} | {r['latency_p99_ms']} | {r['late_p99_ms']} | {r['errors']} |")


if __name__ == "__main__":
    main()
