"""``engine-ctl``: start, stop and inspect the engine, benchmark it, run the demo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
import zmq

from .config import ConfigError, EngineConfig, load_config


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


def _client(cfg: EngineConfig, timeout: float = 60.0):
    from .client import Client
    return Client(cfg.server.front, timeout=timeout)


def _call(fn):
    from .client import EngineError
    try:
        return fn()
    except EngineError as e:
        raise click.ClickException(str(e)) from None


def _print(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.group()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="LSE_CONFIG", default=None,
              help="engine.toml to use (default: ./engine.toml, else built-in defaults)")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Real-time lip-sync engine control."""
    ctx.obj = config_path


def _cfg(ctx: click.Context, local: str | None = None) -> EngineConfig:
    return _load(local or ctx.obj)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None)
@click.option("--detach", is_flag=True, help="run in the background; return once the engine is ready")
@click.option("--timeout", default=300.0, show_default=True, help="seconds to wait for ready with --detach")
@click.pass_context
def start(ctx: click.Context, config_path: str | None, detach: bool, timeout: float) -> None:
    """Start the supervisor (front, GPU workers, compositors)."""
    cfg = _cfg(ctx, config_path)
    if detach:
        start_detached(cfg, timeout)
        return
    from .supervisor import run_supervisor
    sys.exit(run_supervisor(cfg))


def start_detached(cfg: EngineConfig, timeout: float = 300.0) -> None:
    running = control(cfg, "status", 1.0)
    if running is not None:
        raise click.ClickException(f"an engine already answers on {cfg.control_endpoint}")
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    log_path = cfg.run_path / "engine.log"
    args = [sys.executable, "-m", "engine.cli"]
    if cfg.source:
        args += ["--config", cfg.source]
    args += ["start"]
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
    from .supervisor import read_pid
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
    from .supervisor import pid_alive
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
    from .bench import bare_loop, run_bench

    def show(i: int, info: dict[str, Any]) -> None:
        if clients == 1:
            kb = sum(info["frame_sizes"]) / len(info["frame_sizes"]) / 1024
            click.echo(f"batch {i + 1}/{batches}: gpu {info['gpu_id']} frames {info['batch_size']}  "
                       f"inference {info['inference_time_ms']:7.1f} ms  composite {info['composite_time_ms']:7.1f} ms"
                       f"  total {info['total_time_ms']:7.1f} ms  {kb:5.1f} KB/frame")
    click.echo(f"running {batches} batches of {batch_size} on {model!r} with {clients} client(s)...")
    res = run_bench(cfg.server.front, model, batches, batch_size, clients, save, on_batch=show)
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
                      cfg.output.jpeg_quality, cfg.output.chroma_subsampling)
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
@click.option("--json", "as_json", type=click.Path(dir_okay=False), default=None)
@click.pass_context
def bench_streams(ctx: click.Context, model: str, counts: str, seconds: float, as_json: str | None) -> None:
    """Real-time streams: rate, time to first frame, audio-to-frame latency p50/p99 for N streams."""
    from .bench import run_stream_bench
    cfg = _cfg(ctx)
    rows = []
    click.echo(f"{'streams':>8}{'frames':>8}{'min fps':>9}{'first ms':>10}{'lat p50':>9}{'lat p99':>9}"
               f"{'late p99':>10}{'errors':>8}")
    for n in (int(x) for x in counts.split(",")):
        s = run_stream_bench(cfg.server.front, model, n, seconds).summary()
        rows.append(s)
        click.echo(f"{n:>8}{s['frames']:>8}{s['min_rate_fps']:>9}{s['first_frame_ms_max'] or 0:>10}"
                   f"{s['latency_p50_ms']:>9}{s['latency_p99_ms']:>9}{s['late_p99_ms']:>10}{s['errors']:>8}")
    if as_json:
        Path(as_json).write_text(json.dumps(rows, indent=2))


@main.command()
@click.option("--model", default="demo", show_default=True)
@click.option("--wav", type=click.Path(exists=True, dir_okay=False), required=True, help="any rate, mono or stereo")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="the MP4 to write")
@click.option("--timeout", default=120.0, show_default=True, help="seconds to wait for any reply or frame")
@click.pass_context
def render(ctx: click.Context, model: str, wav: str, out: str, timeout: float) -> None:
    """Render MODEL speaking a WAV file to an MP4 (H.264 + AAC) through a running engine."""
    from .render import render as do_render, summary_line
    cfg = _cfg(ctx)
    info = _call(lambda: do_render(cfg.server.front, model, Path(wav), Path(out), timeout))
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
    from .demo_avatars import ensure_avatars
    from .render import render, summary_line
    from .speech import make_speech_wav
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
        info = render(cfg.server.front, "demo", wav, out_dir / "demo.mp4")
        click.echo(summary_line(info))
        with _client(cfg, 10) as c:
            h = c.health()
        click.echo(f"provider {', '.join(h['provider'])}; {h['frames']} frames served")
    finally:
        stop_engine(cfg)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
