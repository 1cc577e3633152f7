"""engine-ctl commands that measure and show: ``check`` (fp16 error), ``bench``, ``bench-streams``,
``render`` and ``demo``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from engine.cli.common import call, cfg_of, client_keys_or_fail, engine_client, print_json
from engine.cli.lifecycle import load_with_progress, start_detached, stop_engine
from engine.runtime.config import EngineConfig
from engine.supervisor.control import control


@click.command()
@click.argument("name")
@click.option("--gpu", "gpu_id", type=int, default=None, help="measure on this GPU (CUDA provider) instead of the CPU")
@click.option("--force", is_flag=True, help="measure again even if the cache has a report for this provider")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.pass_context
def check(ctx: click.Context, name: str, gpu_id: int | None, force: bool, as_json: bool) -> None:
    """What fp16 costs avatar NAME: convert its network (once, cached under <run_dir>/cache/fp16)
    and compare the output with fp32 on the avatar's own frames. No engine needed."""
    cfg = cfg_of(ctx)
    report = check_fp16(cfg, name, gpu_id, force)
    if as_json:
        print_json(report)
        return
    click.echo(f"{name}: fp16 against fp32 on {report['frames']} of its frames ({report['provider']}):")
    click.echo(f"  max |difference| {report['max_abs_diff']:.6f} ({255 * report['max_abs_diff']:.2f} of an 8-bit level), "
               f"mean {report['mean_abs_diff']:.6f}")
    click.echo(f"  {100 * report['pixels_changed']:.2f}% of output values change their 8-bit pixel value")
    click.echo(f"  converted network: {report['file']}")
    click.echo(f"  configured precision: {cfg.precision(name)} ([models.{name}] precision or gpu.precision)")


def check_fp16(cfg: EngineConfig, name: str, gpu_id: int | None = None, force: bool = False) -> dict[str, Any]:
    from engine.avatars.disk import AvatarError, avatar_files
    from engine.worker.precision import error_report
    try:
        files = avatar_files(cfg.models_dir, name, cfg.model(name).path)
    except AvatarError as e:
        raise click.ClickException(str(e)) from None
    enc = next((p for p in (files.folder / cfg.streams.audio_encoder, cfg.models_dir / cfg.streams.audio_encoder)
                if p.is_file()), None)
    if gpu_id is None:
        providers, provider = ["CPUExecutionProvider"], "CPUExecutionProvider"
    else:
        import onnxruntime as ort
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        providers = [("CUDAExecutionProvider", {"device_id": gpu_id}), "CPUExecutionProvider"]
        provider = "CUDAExecutionProvider"
    try:
        return error_report(files.onnx, cfg.cache_dir, files.folder, enc, providers, provider, force)
    except Exception as e:  # noqa: BLE001 - the converter and onnxruntime raise many kinds
        raise click.ClickException(f"{name}: fp16 check failed: {e}") from None


@click.command()
@click.option("--model", default="demo", show_default=True)
@click.option("--batches", default=5, show_default=True)
@click.option("--batch-size", default=24, show_default=True)
@click.option("--clients", default=1, show_default=True)
@click.option("--save", type=click.Path(file_okay=False), default=None, help="write client 0's JPEGs here")
@click.option("--bare", is_flag=True, help="also run the bare in-process loop (same network and batch) for comparison")
@click.option("--json", "as_json", type=click.Path(dir_okay=False), default=None, help="write the figures as JSON")
@click.pass_context
def bench(ctx: click.Context, model: str, batches: int, batch_size: int, clients: int, save: str | None,
          bare: bool, as_json: str | None) -> None:
    """The seed's test client: per-batch inference / composite / total ms, averages, frames/s."""
    cfg = cfg_of(ctx)
    run_bench_cli(cfg, model, batches, batch_size, clients, Path(save) if save else None, bare,
                  Path(as_json) if as_json else None)


def run_bench_cli(cfg: EngineConfig, model: str, batches: int, batch_size: int, clients: int,
                  save: Path | None, bare: bool = False, as_json: Path | None = None) -> dict[str, Any]:
    from engine.cli.bench import bare_loop, run_bench

    def show(i: int, info: dict[str, Any]) -> None:
        if clients == 1:
            kb = sum(info["frame_sizes"]) / len(info["frame_sizes"]) / 1024
            click.echo(f"batch {i + 1}/{batches}: gpu {info['gpu_id']} frames {info['batch_size']}  "
                       f"inference {info['inference_time_ms']:7.1f} ms  composite {info['composite_time_ms']:7.1f} ms"
                       f"  total {info['total_time_ms']:7.1f} ms  {kb:5.1f} KB/frame")
    click.echo(f"running {batches} batches of {batch_size} on {model!r} with {clients} client(s)...")
    res = run_bench(cfg.server.front, model, batches, batch_size, clients, save, on_batch=show, keys=client_keys_or_fail(cfg))
    for e in res.errors:
        click.echo(f"error: {e}", err=True)
    s = res.summary()
    click.echo("-" * 72)
    click.echo(f"frames {s['frames']}  wall {s['wall_s']} s  average inference {s['inference_ms']} ms  "
               f"composite {s['composite_ms']} ms  total {s['total_ms']} ms per batch")
    click.echo(f"throughput {s['fps']} frames/s ({s['per_client_fps']} per client), {s['jpeg_kb']} KB per JPEG")
    out: dict[str, Any] = {"engine": s}
    if bare:
        click.echo("running the bare in-process loop on the same network and batch...")
        b = bare_loop(cfg.models_dir, model, batches, batch_size, cfg.model(model).paste,
                      cfg.output.jpeg_quality, cfg.output.chroma_subsampling, encoder=cfg.output.encoder)
        out["bare"] = b
        click.echo(f"bare loop {b['fps']} frames/s; engine / bare = {s['fps'] / b['fps']:.2f}")
    if save:
        click.echo(f"client 0's frames saved in {save}")
    if as_json:
        as_json.write_text(json.dumps(out, indent=2))
    if res.errors:
        raise click.ClickException(f"{len(res.errors)} batch(es) failed")
    return out


@click.command("bench-streams")
@click.option("--model", default="demo", show_default=True)
@click.option("--streams", "counts", default="1,2,3", show_default=True, help="stream counts to try, comma-separated")
@click.option("--seconds", default=6.0, show_default=True, help="seconds of speech each stream sends in real time")
@click.option("--search", is_flag=True, help="find the most streams that all keep >= --rate frames/s with p99 "
              "latency within --slack-ms of the floor (instead of --streams)")
@click.option("--max", "limit", default=64, show_default=True, help="--search: the largest count tried "
              "(the engine refuses more than streams.max_streams)")
@click.option("--start", default=1, show_default=True, help="--search: the first count tried (then doubled)")
@click.option("--rate", default=24.5, show_default=True, help="--search: frames/s every stream must keep")
@click.option("--slack-ms", default=150.0, show_default=True, help="--search: p99 latency allowed above the floor")
@click.option("--processes", default=1, show_default=True, help="client processes the streams are spread over")
@click.option("--json", "as_json", type=click.Path(dir_okay=False), default=None)
@click.pass_context
def bench_streams(ctx: click.Context, model: str, counts: str, seconds: float, search: bool, limit: int,
                  start: int, rate: float, slack_ms: float, processes: int, as_json: str | None) -> None:
    """Real-time streams: rate, time to first frame, audio-to-frame latency p50/p99 for N streams,
    and the engine's CPU time per stream (all its processes, and its compositors, in % of one core
    per 25 frames/s stream, on this host; the clients are not counted); or (--search) how many
    streams one engine holds in real time."""
    cfg = cfg_of(ctx)
    if search:
        out: Any = run_capacity_cli(cfg, model, limit, start, seconds, rate, slack_ms, processes)
    else:
        out = []
        _stream_header()
        for n in (int(x) for x in counts.split(",")):
            s = measure_streams(cfg, model, n, seconds, processes)
            out.append(s)
            _stream_row(s)
    if as_json:
        Path(as_json).write_text(json.dumps(out, indent=2))


def measure_streams(cfg: EngineConfig, model: str, n: int, seconds: float, processes: int = 1) -> dict[str, Any]:
    """One stream benchmark run's summary, with the engine's CPU per stream (by role)."""
    from engine.cli.bench import engine_cpu_seconds, run_stream_bench
    st = control(cfg, "status")
    roles = {p["pid"]: p["role"] for p in (st or {}).get("processes", []) if p.get("pid")}
    cpu0 = engine_cpu_seconds(roles)
    s = run_stream_bench(cfg.server.front, model, n, seconds, keys=client_keys_or_fail(cfg), processes=processes).summary()
    cpu1 = engine_cpu_seconds(roles)
    per_role = {r: round(100 * (cpu1[r] - cpu0.get(r, 0.0)) / (n * seconds), 1) for r in cpu1}
    s["cpu_per_stream_pct"] = {"total": round(sum(per_role.values()), 1), **per_role} if roles else None
    return s


def _stream_header() -> None:
    click.echo(f"{'streams':>8}{'frames':>8}{'min fps':>9}{'first ms':>10}{'lat p50':>9}{'lat p99':>9}"
               f"{'late p99':>10}{'errors':>8}{'cpu/stream':>12}{'compositors':>13}")


def _stream_row(s: dict[str, Any], note: str = "") -> None:
    cpu = s.get("cpu_per_stream_pct")
    total = f"{cpu['total']}%" if cpu else "-"
    comp = f"{cpu.get('compositor', 0.0)}%" if cpu else "-"
    click.echo(f"{s['streams']:>8}{s['frames']:>8}{s['min_rate_fps']:>9}{s['first_frame_ms_max'] or 0:>10}"
               f"{s['latency_p50_ms']:>9}{s['latency_p99_ms']:>9}{s['late_p99_ms']:>10}{s['errors']:>8}"
               f"{total:>12}{comp:>13}{note}")


def run_capacity_cli(cfg: EngineConfig, model: str, limit: int, start: int = 1, seconds: float = 6.0,
                     rate: float = 24.5, slack_ms: float = 150.0, processes: int = 1,
                     warmup: bool = True) -> dict[str, Any]:
    """``bench-streams --search``: the stream capacity, printed with its neighbours' figures."""
    from engine.cli.bench import run_stream_bench, search_capacity
    front = cfg.server.front
    if warmup:
        # the avatar in memory and its network loaded (and spread over the workers) before measuring
        with engine_client(cfg, 600) as c:
            call(lambda: c.load(model))
        n = min(limit, 4)
        click.echo(f"warm-up: {n} stream(s) for 2 s on {model!r} (not counted)")
        run_stream_bench(front, model, n, 2.0, keys=client_keys_or_fail(cfg), processes=min(processes, n))
    click.echo(f"searching the most real-time streams on {model!r}: every stream >= {rate} frames/s, "
               f"p99 audio-to-frame latency <= floor + {slack_ms:.0f} ms; {seconds} s of speech each")
    _stream_header()

    def measure(n: int) -> dict[str, Any]:
        return measure_streams(cfg, model, n, seconds, processes)

    def show(row: dict[str, Any]) -> None:
        _stream_row(row, "  ok" if row["ok"] else f"  no: {row['why']}")

    best, rows = search_capacity(measure, limit, start, rate, slack_ms, on_row=show)
    by_n = {r["streams"]: r for r in rows}
    click.echo("-" * 72)
    click.echo(f"capacity: {best} concurrent real-time stream(s) on {model!r} "
               f"(>= {rate} frames/s, p99 within {slack_ms:.0f} ms of the {rows[0]['floor_ms']:.0f} ms floor)")
    for n in (best - 1, best, best + 1):
        if n in by_n:
            r = by_n[n]
            click.echo(f"  {n:>4} streams: slowest {r['min_rate_fps']} frames/s, latency p50 {r['latency_p50_ms']} "
                       f"/ p99 {r['latency_p99_ms']} ms, {r['errors']} errors  {'ok' if r['ok'] else r['why']}")
    if best == limit:
        click.echo(f"  (the search stopped at --max {limit}; the engine may hold more)")
    return {"capacity": best, "rate": rate, "slack_ms": slack_ms, "seconds": seconds, "rows": rows}


@click.command()
@click.option("--model", default="demo", show_default=True)
@click.option("--wav", type=click.Path(exists=True, dir_okay=False), required=True, help="any rate, mono or stereo")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="the MP4 to write")
@click.option("--timeout", default=120.0, show_default=True, help="seconds to wait for any reply or frame")
@click.pass_context
def render(ctx: click.Context, model: str, wav: str, out: str, timeout: float) -> None:
    """Render MODEL speaking a WAV file to an MP4 (H.264 + AAC) through a running engine."""
    from engine.cli.render import render as do_render
    from engine.cli.render import summary_line
    cfg = cfg_of(ctx)
    keys = client_keys_or_fail(cfg)
    info = call(lambda: do_render(cfg.server.front, model, Path(wav), Path(out), timeout, keys=keys))
    click.echo(summary_line(info))


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="out/demo", show_default=True)
@click.option("--batches", default=5, show_default=True)
@click.option("--batch-size", default=24, show_default=True)
@click.pass_context
def demo(ctx: click.Context, out: str, batches: int, batch_size: int) -> None:
    """The main job on the built-in demo avatar: make it if missing, start, bench, save frames,
    render the demo avatar speaking to an MP4, stop."""
    cfg = cfg_of(ctx)
    from engine.audio.speech import make_speech_wav
    from engine.cli.demo_avatars import ensure_avatars
    from engine.cli.render import render, summary_line
    click.echo(f"avatars under {cfg.models_dir}: making what is missing...")
    ensure_avatars(cfg.models_dir)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start_detached(cfg)
    try:
        load_with_progress(cfg, "demo")
        run_bench_cli(cfg, "demo", batches, batch_size, 1, out_dir / "frames")
        wav = make_speech_wav(out_dir / "speech.wav", seconds=8.0)
        click.echo(f"rendering the demo avatar speaking {wav} through a stream...")
        info = render(cfg.server.front, "demo", wav, out_dir / "demo.mp4", keys=client_keys_or_fail(cfg))
        click.echo(summary_line(info))
        with engine_client(cfg, 10) as c:
            h = c.health()
        click.echo(f"provider {', '.join(h['provider'])}; {h['frames']} frames served")
    finally:
        stop_engine(cfg)
