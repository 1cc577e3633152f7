"""``engine-ctl bench-networks``: many networks of one architecture resident in one GPU worker's
inference core, with shared sessions and with a session per network, side by side.

N networks of the ``bench`` architecture (SyncTalk_2D's ``unet_328`` size, 48.6 MB fp32), each with
its own weights (the bench network's, perturbed by a seeded 1 %), are written once to a folder.
Each mode runs in a fresh process (so that its memory is its own) and reports:

- ``first_load_ms``: the first network (the session, and its warm-up at every batch size);
- ``resident_ms``: making each further network resident (median, max), its split prepared before
  (``split_ms``: the one-off split per network file), as a freshly started worker does it: finding
  the cached split by the file's hash (kept on disk), one read of the weights file, its tensors on
  the device;
- ``bytes_per_network``: resident-set growth per further network (device memory by NVML on CUDA)
  while none is evicted yet (the per-network mode holds ``--own-capacity``), against
  ``weight_bytes`` at the precision;
- ``round_robin``: N batches, one per network in turn, all resident: wall time, and the first
  request of a network (made resident, then run) against a warm batch;
- ``rss_growth_bytes``: the process's memory after that round robin less its memory before the
  first network (device memory by NVML on CUDA), and on the CPU ``peak_growth_bytes``, its peak
  resident set (``ru_maxrss``) less the same start;
- ``run_ms``: one batch per bucket size, median of 5.

The per-network mode holds ``--own-capacity`` sessions (``capacity.models_per_device``), so its
round robin builds a session for every request once N exceeds it, as the engine would.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from engine.cli.common import print_json

WEIGHT_NOISE = 0.01


def write_networks(folder: Path, n: int, arch: str = "bench") -> list[Path]:
    """N networks of the ``bench`` (or the small ``demo``) architecture with distinct weights
    (made once; kept in ``folder``)."""
    import onnx
    from onnx import numpy_helper

    from engine.cli.demo_networks import build_bench_network, build_demo_network
    from engine.worker.weights import movable
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{arch}{i:04d}.onnx" for i in range(n)]
    if all(p.is_file() for p in paths):
        return paths
    base = build_bench_network() if arch == "bench" else build_demo_network()
    for i, p in enumerate(paths):
        if p.is_file():
            continue
        rng = np.random.default_rng(i)
        model = onnx.ModelProto()
        model.CopyFrom(base)
        for t in movable(model):                  # the weights, not the constants Resize needs
            if t.data_type == onnx.TensorProto.FLOAT:
                a = numpy_helper.to_array(t)
                a = a * (1 + WEIGHT_NOISE * rng.standard_normal(a.shape, np.float32))
                t.CopyFrom(numpy_helper.from_array(a.astype(np.float32), t.name))
        tmp = p.with_suffix(".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, p)
    return paths


def _memory(device: int | None) -> int:
    if device is None:
        import psutil
        return psutil.Process().memory_info().rss
    import pynvml
    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device)).used


def measure_mode(paths: list[str], shared: bool, device: int | None, precision: str, batch: int,
                 buckets: Any, own_capacity: int, cache_dir: str, threads: int) -> dict[str, Any]:
    """One mode, in this (fresh) process."""
    from engine.worker.inference import InferenceCore
    from engine.worker.weights import prepare
    files = [Path(p) for p in paths]
    core = InferenceCore(device, capacity=len(files) if shared else own_capacity, intra_op_threads=threads,
                         buckets=buckets, max_batch=max(batch, 1), cache_dir=Path(cache_dir),
                         shared_sessions=shared)
    from engine.worker import precision as fp16
    if precision == "fp16":                         # converted before either mode is timed
        for f in files:
            fp16.fp16_model(f, core.cache_dir)
    split_ms = []
    if shared:
        for f in files:
            t0 = time.perf_counter()
            prepare(fp16.fp16_model(f, core.cache_dir) if precision == "fp16" else f, core.cache_dir)
            split_ms.append(1000 * (time.perf_counter() - t0))
    fp16._hashes.clear()        # a worker starts without them in memory: loads find them on disk (cache/sha256)
    rng = np.random.default_rng(0)

    def batch_inputs(m, b: int = batch):
        return (rng.random((b, *m.graph.image_shape), np.float32),
                rng.standard_normal((b, *m.graph.audio_shape)).astype(np.float32),
                np.empty((b, *m.graph.output_shape), np.float32))
    mem0 = _memory(device)
    t0 = time.perf_counter()
    first = core.load("net0", files[0], precision)
    first_ms = 1000 * (time.perf_counter() - t0)
    g = batch_inputs(first)
    core.run(first, *g)
    mem1 = _memory(device)
    resident, first_req = [], []
    held = min(len(files), core.capacity if not shared else len(files))   # memory: before any eviction
    mem2 = mem1
    for i, f in enumerate(files[1:], 1):
        t0 = time.perf_counter()
        m = core.load(f"net{i}", f, precision)
        t1 = time.perf_counter()
        core.run(m, *g)
        t2 = time.perf_counter()
        resident.append(1000 * (t1 - t0))
        first_req.append(1000 * (t2 - t0))
        if i == held - 1:
            mem2 = _memory(device)
    warm = []
    t0 = time.perf_counter()
    for i in range(len(files)):
        name = f"net{i}"
        m = core.models.get(name) or core.load(name, files[i], precision)
        t1 = time.perf_counter()
        core.run(m, *g)
        warm.append(1000 * (time.perf_counter() - t1))
    wall = time.perf_counter() - t0
    mem3 = _memory(device)
    peak = None
    if device is None:
        import resource
        # Linux: KiB, and the kernel's high-water mark lags the current count by up to a few pages' worth
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, mem3) - mem0
    run_ms = {}
    m = core.models[next(reversed(core.models))]
    for b in m.sizes or (1, batch):
        x = batch_inputs(m, b)
        ts = []
        for _ in range(6):
            t = time.perf_counter()
            core.run(m, *x)
            ts.append(1000 * (time.perf_counter() - t))
        run_ms[b] = round(statistics.median(ts[1:]), 2)
    per = (mem2 - mem1) / max(1, held - 1)
    wb = first.weight_bytes
    st = core.stats()["resident"]
    return {"mode": "shared" if shared else "own", "networks": len(files), "precision": precision,
            "provider": core.provider, "batch": batch,
            "split_ms": _dist(split_ms), "first_load_ms": round(first_ms, 1), "resident_ms": _dist(resident),
            "first_request_ms": _dist(first_req), "warm_batch_ms": _dist(warm),
            "first_request_vs_warm": round(statistics.median(first_req) / statistics.median(warm), 2) if first_req else None,
            "bytes_per_network": int(per), "weight_bytes": int(wb), "bytes_vs_weights": round(per / wb, 2) if wb else None,
            "memory_before": mem0, "round_robin_s": round(wall, 4), "rss_growth_bytes": mem3 - mem0,
            "peak_growth_bytes": peak, "run_ms": run_ms,
            "resident": st["networks"], "sessions_built": st["sessions_built"], "loads": st["loads"]}


def _dist(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"median": round(statistics.median(xs), 1), "max": round(max(xs), 1), "count": len(xs)}


def run_modes(paths: list[Path], device: int | None, precision: str, batch: int, buckets: Any,
              own_capacity: int, cache_dir: Path, threads: int, modes: tuple[str, ...]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    out = []
    for mode in modes:
        with ctx.Pool(1) as pool:
            out.append(pool.apply(measure_mode, ([str(p) for p in paths], mode == "shared", device, precision,
                                                 batch, buckets, own_capacity, str(cache_dir), threads)))
    return out


@click.command("bench-networks")
@click.option("--networks", "count", default=40, show_default=True, help="networks of the architecture")
@click.option("--arch", type=click.Choice(["bench", "demo"]), default="bench", show_default=True,
              help="bench: SyncTalk_2D's size (48.6 MB); demo: the small demo network")
@click.option("--dir", "folder", type=click.Path(file_okay=False), default=None,
              help="where the networks are written (kept; default: <run_dir>/bench-networks)")
@click.option("--gpu", "gpu_id", type=int, default=None, help="on this GPU (CUDA provider) instead of the CPU")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--batch", default=4, show_default=True, help="frames per batch")
@click.option("--buckets", default="off", show_default=True, help='"off", "auto" or sizes such as 1,4,8')
@click.option("--own-capacity", default=8, show_default=True, help="sessions the per-network mode keeps")
@click.option("--threads", default=0, show_default=True, help="ONNX Runtime intra-op threads (0: its default)")
@click.option("--modes", default="own,shared", show_default=True)
@click.option("--json", "as_json", type=click.Path(dir_okay=False), default=None, help="write the figures as JSON")
@click.pass_context
def bench_networks(ctx: click.Context, count: int, arch: str, folder: str | None, gpu_id: int | None, precision: str,
                   batch: int, buckets: str, own_capacity: int, threads: int, modes: str, as_json: str | None) -> None:
    """Many avatars' networks resident in one worker: shared sessions against a session per network."""
    from engine.cli.common import cfg_of
    cfg = cfg_of(ctx)
    where = Path(folder) if folder else cfg.run_path / "bench-networks"
    b: Any = buckets if buckets in ("off", "auto") else tuple(int(x) for x in buckets.split(","))
    click.echo(f"writing {count} networks of the {arch} architecture to {where} (once)...")
    paths = write_networks(where, count, arch)
    rows = run_modes(paths, gpu_id, precision, batch, b, own_capacity, where / "cache", threads,
                     tuple(m.strip() for m in modes.split(",")))
    for r in rows:
        click.echo(f"{r['mode']:>6}: first load {r['first_load_ms']:.0f} ms; each further network resident in "
                   f"{r['resident_ms']['median']:.1f} ms (max {r['resident_ms']['max']:.1f}); "
                   f"{r['bytes_per_network'] / 1e6:.1f} MB per network ({r['bytes_vs_weights']} x its weights); "
                   f"first request {r['first_request_vs_warm']} x a warm batch; round robin of {r['networks']} "
                   f"in {r['round_robin_s']} s, memory {r['rss_growth_bytes'] / 1e6:.0f} MB above its start "
                   f"after it; batch ms by size {r['run_ms']}")
    print_json({"date": time.strftime("%Y-%m-%d"), "rows": rows})
    if as_json:
        Path(as_json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
