"""``engine-ctl``: start, stop and inspect the engine, benchmark it, run the demo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import zmq

from engine.runtime.config import ConfigError, EngineConfig, load_config


def _load(path: str | None) -> EngineConfig:
    try:
        if path is None and Path("engine.toml").is_file():
            path = "engine.toml"
        return load_config(path)
    except ConfigError as e:
        raise click.ClickException(f"configuration: {e}") from None


def control(cfg: EngineConfig, cmd: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """Ask the supervisor; None when no engine answers."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(cfg.control_endpoint)
        sock.send_multipart([b"", json.dumps({"cmd": cmd}).encode()])
        if not sock.poll(int(timeout * 1000)):
            return None
        return json.loads(sock.recv_multipart()[-1])
    finally:
        sock.close(0)


def _keys(cfg: EngineConfig):
    """The CURVE keys engine-ctl connects to the front with (None: plain text)."""
    from engine.front.security import SecurityError, client_keys
    try:
        return client_keys(cfg)
    except SecurityError as e:
        raise click.ClickException(str(e)) from None


def _client(cfg: EngineConfig, timeout: float = 60.0):
    from engine.client import Client
    return Client(cfg.server.front, timeout=timeout, keys=_keys(cfg))


def _call(fn):
    from engine.client import EngineError
    try:
        return fn()
    except EngineError as e:
        raise click.ClickException(str(e)) from None


def _print(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.group()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="LSE_CONFIG", default=None,
              help="engine.toml to use (default: ./engine.toml, else built-in defaults)")
@click.option("--client-key", type=click.Path(exists=True, dir_okay=False), envvar="LSE_CLIENT_KEY", default=None,
              help="this client's secret certificate (NAME.key_secret) for an engine with CURVE (client.secret_key)")
@click.option("--server-key", type=click.Path(exists=True, dir_okay=False), envvar="LSE_SERVER_KEY", default=None,
              help="the engine's public certificate (client.server_key; default: the one in "
                   "server.curve_secret_key)")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, client_key: str | None, server_key: str | None) -> None:
    """Real-time lip-sync engine control."""
    ctx.obj = {"config": config_path, "client_key": client_key, "server_key": server_key}


def _cfg(ctx: click.Context, local: str | None = None) -> EngineConfig:
    obj = ctx.obj or {}
    cfg = _load(local or obj.get("config"))
    client = cfg.client
    if obj.get("client_key"):
        client = replace(client, secret_key=str(Path(obj["client_key"]).resolve()))
    if obj.get("server_key"):
        client = replace(client, server_key=str(Path(obj["server_key"]).resolve()))
    return replace(cfg, client=client)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None)
@click.option("--detach", is_flag=True, help="run in the background (log: <run_dir>/engine.log unless "
              "server.log_file says otherwise); return once the engine is ready")
@click.option("--timeout", default=300.0, show_default=True, help="seconds to wait for ready with --detach")
@click.option("--log-file", default=None, type=click.Path(dir_okay=False),
              help="write every process's output here, size-rotated (server.log_file)")
@click.pass_context
def start(ctx: click.Context, config_path: str | None, detach: bool, timeout: float, log_file: str | None) -> None:
    """Start the supervisor (front, GPU workers, compositors)."""
    cfg = _cfg(ctx, config_path)
    if log_file is not None:
        cfg = replace(cfg, server=replace(cfg.server, log_file=str(Path(log_file).resolve())))
    from engine.front.security import SecurityError, preflight
    try:
        for warning in preflight(cfg):
            click.echo(f"warning: {warning}", err=True)
    except SecurityError as e:
        raise click.ClickException(f"configuration: {e}") from None
    if detach:
        start_detached(cfg, timeout)
        return
    from engine.supervisor.supervisor import run_supervisor
    sys.exit(run_supervisor(cfg))


def start_detached(cfg: EngineConfig, timeout: float = 300.0) -> None:
    running = control(cfg, "status", 1.0)
    if running is not None:
        raise click.ClickException(f"an engine already answers on {cfg.control_endpoint}")
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    log_path = cfg.log_path if cfg.server.log_file else cfg.run_path / "engine.log"
    args = [sys.executable, "-m", "engine.cli"]
    if cfg.source:
        args += ["--config", cfg.source]
    args += ["start", "--log-file", str(log_path)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(cfg.root_dir) if cfg.source else None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            raise click.ClickException("the engine exited during start-up:\n" + "\n".join(tail))
        st = control(cfg, "status", 1.0)
        if st and st.get("ready"):
            click.echo(f"engine ready (pid {proc.pid}), front {cfg.server.front}, log {log_path}")
            return
        time.sleep(0.3)
    proc.terminate()
    raise click.ClickException(f"the engine was not ready within {timeout} s; see {log_path}")


@main.command()
@click.option("--timeout", default=30.0, show_default=True)
@click.pass_context
def stop(ctx: click.Context, timeout: float) -> None:
    """Stop a running engine and wait until it is gone."""
    cfg = _cfg(ctx)
    stop_engine(cfg, timeout)


def stop_engine(cfg: EngineConfig, timeout: float = 30.0) -> None:
    from engine.supervisor.supervisor import read_pid
    pid = read_pid(cfg)
    if control(cfg, "stop", 2.0) is None and pid is None:
        raise click.ClickException("no engine is running")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_pid(cfg) is None and (pid is None or not _alive(pid)):
            click.echo("engine stopped")
            return
        time.sleep(0.2)
    raise click.ClickException(f"the engine did not stop within {timeout} s")


def _alive(pid: int) -> bool:
    from engine.supervisor.supervisor import pid_alive
    return pid_alive(pid)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Every engine process: role, pid, state, restarts, uptime, memory."""
    cfg = _cfg(ctx)
    st = control(cfg, "status")
    if st is None:
        raise click.ClickException("no engine answers on " + cfg.control_endpoint)
    if as_json:
        _print(st)
        return
    click.echo(f"engine {st['version']}  {'ready' if st['ready'] else 'starting'}  front {st['front']}")
    click.echo(f"{'role':<12}{'idx':>4}{'pid':>9}  {'state':<11}{'restarts':>9}{'uptime s':>10}{'RSS MB':>9}"
               f"{'USS MB':>9}")
    for p in st["processes"]:
        click.echo(f"{p['role']:<12}{p['idx']:>4}{p['pid'] or '-':>9}  {p['state']:<11}{p['restarts']:>9}"
                   f"{p['uptime_s']:>10.1f}{p['rss_bytes'] / 1e6:>9.1f}{p.get('uss_bytes', 0) / 1e6:>9.1f}")
    total = sum(s["resident"] for s in st["shared_memory"])
    click.echo(f"shared memory: {len(st['shared_memory'])} segments, {total / 1e6:.1f} MB resident")
    for seg in st["shared_memory"]:
        click.echo(f"  {seg['name']:<32}{seg['size'] / 1e6:>10.1f} MB mapped {seg['resident'] / 1e6:>10.1f} MB resident")


@main.command()
@click.pass_context
def health(ctx: click.Context) -> None:
    """The front's health reply."""
    with _client(_cfg(ctx), 10) as c:
        _print(_call(c.health))


@main.command()
@click.pass_context
def models(ctx: click.Context) -> None:
    """Every avatar under models_root: loaded or not, requests, mean time, memory, last used."""
    with _client(_cfg(ctx), 10) as c:
        _print(_call(c.models))


@main.command()
@click.argument("name")
@click.pass_context
def load(ctx: click.Context, name: str) -> None:
    """Load an avatar's backgrounds into shared memory (with a progress bar) and its network."""
    cfg = _cfg(ctx)
    load_with_progress(cfg, name)


def load_with_progress(cfg: EngineConfig, name: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    error: list[Exception] = []

    def do_load() -> None:
        try:
            with _client(cfg, 600) as c:
                result.update(c.load(name))
        except Exception as e:  # noqa: BLE001
            error.append(e)
    t = threading.Thread(target=do_load, daemon=True)
    t.start()
    with _client(cfg, 10) as poll, click.progressbar(length=1, label=f"loading {name}", file=sys.stderr) as bar:
        shown = 0
        while t.is_alive():
            t.join(0.2)
            try:
                m = next((m for m in poll.models() if m["name"] == name), None)
            except Exception:  # noqa: BLE001
                m = None
            if m and m.get("progress"):
                done, total = m["progress"]
                bar.length = max(total, 1)
                bar.update(done - shown)
                shown = done
        if result:
            bar.update(bar.length - shown)
    if error:
        raise click.ClickException(str(error[0]))
    click.echo(f"{name}: {result.get('frames')} frames {result.get('width')}x{result.get('height')}, "
               f"{result['memory_bytes']['backgrounds'] / 1e6:.1f} MB in shared memory, "
               f"loaded in {result.get('load_ms')} ms")
    return result


@main.command()
@click.argument("name")
@click.pass_context
def unload(ctx: click.Context, name: str) -> None:
    """Drop an avatar's backgrounds and networks."""
    with _client(_cfg(ctx), 10) as c:
        _print(_call(lambda: c.unload(name)))


@main.command()
@click.argument("name")
@click.option("--gpu", "gpu_id", type=int, default=None, help="measure on this GPU (CUDA provider) instead of the CPU")
@click.option("--force", is_flag=True, help="measure again even if the cache has a report for this provider")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.pass_context
def check(ctx: click.Context, name: str, gpu_id: int | None, force: bool, as_json: bool) -> None:
    """What fp16 costs avatar NAME: convert its network (once, cached under <run_dir>/cache/fp16)
    and compare the output with fp32 on the avatar's own frames. No engine needed."""
    cfg = _cfg(ctx)
    report = check_fp16(cfg, name, gpu_id, force)
    if as_json:
        _print(report)
        return
    click.echo(f"{name}: fp16 against fp32 on {report['frames']} of its frames ({report['provider']}):")
    click.echo(f"  max |difference| {report['max_abs_diff']:.6f} ({255 * report['max_abs_diff']:.2f} of an 8-bit level), "
               f"mean {report['mean_abs_diff']:.6f}")
    click.echo(f"  {100 * report['pixels_changed']:.2f}% of output values change their 8-bit pixel value")
    click.echo(f"  converted network: {report['file']}")
    click.echo(f"  configured precision: {cfg.precision(name)} ([models.{name}] precision or gpu.precision)")


def check_fp16(cfg: EngineConfig, name: str, gpu_id: int | None = None, force: bool = False) -> dict[str, Any]:
    from engine.avatars.frames import AvatarError, avatar_files
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


@main.command()
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
    cfg = _cfg(ctx)
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
    res = run_bench(cfg.server.front, model, batches, batch_size, clients, save, on_batch=show, keys=_keys(cfg))
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


@main.command("bench-streams")
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
    cfg = _cfg(ctx)
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
    s = run_stream_bench(cfg.server.front, model, n, seconds, keys=_keys(cfg), processes=processes).summary()
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
        with _client(cfg, 600) as c:
            _call(lambda: c.load(model))
        n = min(limit, 4)
        click.echo(f"warm-up: {n} stream(s) for 2 s on {model!r} (not counted)")
        run_stream_bench(front, model, n, 2.0, keys=_keys(cfg), processes=min(processes, n))
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


@main.command()
@click.option("--model", default="demo", show_default=True)
@click.option("--wav", type=click.Path(exists=True, dir_okay=False), required=True, help="any rate, mono or stereo")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="the MP4 to write")
@click.option("--timeout", default=120.0, show_default=True, help="seconds to wait for any reply or frame")
@click.pass_context
def render(ctx: click.Context, model: str, wav: str, out: str, timeout: float) -> None:
    """Render MODEL speaking a WAV file to an MP4 (H.264 + AAC) through a running engine."""
    from engine.cli.render import render as do_render, summary_line
    cfg = _cfg(ctx)
    keys = _keys(cfg)
    info = _call(lambda: do_render(cfg.server.front, model, Path(wav), Path(out), timeout, keys=keys))
    click.echo(summary_line(info))


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="out/demo", show_default=True)
@click.option("--batches", default=5, show_default=True)
@click.option("--batch-size", default=24, show_default=True)
@click.pass_context
def demo(ctx: click.Context, out: str, batches: int, batch_size: int) -> None:
    """The main job on the built-in demo avatar: make it if missing, start, bench, save frames,
    render the demo avatar speaking to an MP4, stop."""
    cfg = _cfg(ctx)
    from engine.cli.demo_avatars import ensure_avatars
    from engine.cli.render import render, summary_line
    from engine.audio.speech import make_speech_wav
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
        info = render(cfg.server.front, "demo", wav, out_dir / "demo.mp4", keys=_keys(cfg))
        click.echo(summary_line(info))
        with _client(cfg, 10) as c:
            h = c.health()
        click.echo(f"provider {', '.join(h['provider'])}; {h['frames']} frames served")
    finally:
        stop_engine(cfg)


@main.command()
@click.argument("name")
@click.option("--dir", "folder", type=click.Path(file_okay=False), default="keys", show_default=True,
              help="where to write NAME.key and NAME.key_secret")
@click.option("--force", is_flag=True, help="replace an existing key pair of that name")
def keygen(name: str, folder: str, force: bool) -> None:
    """Write a CURVE key pair: NAME.key (public: give it to the other side) and NAME.key_secret
    (secret, mode 0600: keep it). The engine's pair is server.curve_secret_key; a client's public
    NAME.key goes into the engine's server.curve_clients folder, and NAME is its key's name in
    quotas, logs and metrics."""
    from engine.runtime.keys import CertificateError, generate, load
    try:
        public, secret = generate(folder, name, force)
    except CertificateError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"public key {load(public)[0].decode()}")
    click.echo(f"wrote {public} (public) and {secret} (secret, mode 600)")


@main.group()
def avatar() -> None:
    """Bring your own avatar: import one from a video or a SyncTalk_2D dataset, check one."""


@avatar.command("import")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--name", required=True, help="the avatar's name: its folder under models_root")
@click.option("--network", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="the trained lip-sync network (ONNX, SyncTalk_2D I/O contract [B,6,F,F] + audio -> [B,3,F,F])")
@click.option("--audio-encoder", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="its audio encoder (ONNX, [N,1,80,16] -> [N,D]); copied into the avatar's folder")
@click.option("--start", default=0.0, show_default=True, help="seconds into SOURCE to start at")
@click.option("--end", type=float, default=None, help="seconds into SOURCE to stop at (default: its end)")
@click.option("--force", is_flag=True, help="replace an avatar of that name")
@click.option("--crop-scale", default=None, type=click.FloatRange(0.2, 3.0),
              help="video: crop side / detected face width  [default: 0.86]")
@click.option("--crop-top", default=None, type=click.FloatRange(-1.0, 1.5),
              help="video: crop top below the face box top, in face heights  [default: 0.43]")
@click.option("--frame-format", type=click.Choice(["png", "jpg"]), default="png", show_default=True,
              help="video: how the frames are stored (png lossless; jpg quality 95, about 5x smaller)")
@click.pass_context
def avatar_import(ctx: click.Context, source: Path, name: str, network: Path, audio_encoder: Path | None,
                  start: float, end: float | None, force: bool, crop_scale: float | None, crop_top: float | None,
                  frame_format: str) -> None:
    """Make avatar NAME under models_root from SOURCE: a video (decoded at 25 frames/s, the face
    found in every frame, smoothed square crop rectangles) or a SyncTalk_2D dataset folder
    (full_body_img/ + landmarks/: its frames, and the rectangles SyncTalk_2D's inference crops).

    Nothing is left under models_root when it fails. Then: engine-ctl avatar check NAME.
    """
    from engine.avatars.disk import AvatarError
    from engine.avatars.importer import import_synctalk, import_video, is_synctalk_dataset
    from engine.avatars.crop_rects import CROP_SCALE, CROP_TOP
    cfg = _cfg(ctx)
    common = dict(start=start, end=end, force=force, encoder_name=cfg.streams.audio_encoder,
                  face_room=cfg.ring.max_face)
    with click.progressbar(length=1, label=f"importing {name}", file=sys.stderr) as bar:
        shown = [0]

        def progress(done: int, total: int) -> None:
            bar.length = max(total, done, 1)
            bar.update(done - shown[0])
            shown[0] = done
        try:
            if source.is_dir():
                if crop_scale is not None or crop_top is not None:
                    raise click.UsageError("--crop-scale/--crop-top apply to videos; a SyncTalk_2D dataset's "
                                           "rectangles come from its landmarks")
                if not is_synctalk_dataset(source):
                    raise AvatarError(f"{source}: a folder, but not a SyncTalk_2D dataset (expected full_body_img/ "
                                      "and landmarks/ in it)")
                result = import_synctalk(cfg.models_dir, name, source, network, audio_encoder, progress=progress,
                                         **common)
            else:
                result = import_video(cfg.models_dir, name, source, network, audio_encoder, progress=progress,
                                      crop_scale=CROP_SCALE if crop_scale is None else crop_scale,
                                      crop_top=CROP_TOP if crop_top is None else crop_top,
                                      frame_format=frame_format, **common)
        except AvatarError as e:
            raise click.ClickException(str(e)) from None
    click.echo(result.summary())
    click.echo(f"next: engine-ctl avatar check {name}; engine-ctl load {name}")


@avatar.command("check")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--no-run", is_flag=True, help="do not load and run the network in ONNX Runtime")
@click.pass_context
def avatar_check(ctx: click.Context, name: str, as_json: bool, no_run: bool) -> None:
    """Check avatar NAME as the engine will when it loads and serves it: frames against rectangles,
    frame sizes, rectangles inside their frames, their size spread and jumps, the network's I/O
    contract (and a run in ONNX Runtime), the audio encoder, the shared memory it will take.
    Exits 1 when the engine would refuse it."""
    from engine.cli.avatar_check import check_avatar
    cfg = _cfg(ctx)
    with click.progressbar(length=1, label=f"checking {name}", file=sys.stderr) as bar:
        shown = [0]

        def progress(done: int, total: int) -> None:
            bar.length = max(total, 1)
            bar.update(done - shown[0])
            shown[0] = done
        rep = check_avatar(cfg, name, run_network=not no_run, progress=progress)
    click.echo(rep.as_json() if as_json else rep.text())
    if not rep.ok:
        sys.exit(1)
