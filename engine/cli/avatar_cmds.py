"""engine-ctl avatar import / check: bring your own avatar."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from engine.cli.common import cfg_of


@click.group()
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
@click.option("--detect-threshold", default=0.0, show_default=True, type=click.FloatRange(-2.0, 2.0),
              help="video: the face detector's score threshold; lower (e.g. -0.3) finds faces it scores low "
                   "(turned, dim, small), and more false ones")
@click.option("--predictor", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="video: a dlib 68-point shape predictor (.dat) to use instead of the one in "
                   "face_recognition_models (e.g. one you trained, for a commercial licence)")
@click.option("--rects", "rects_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="video: your own crop rectangles, JSON [[x1, y1, x2, y2], ...], one per imported frame "
                   "(25 frames/s from --start); no face detection")
@click.option("--landmarks", "lms_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="video: your own landmarks, JSON [[[x, y] x 68 or 98], ...], one list per imported frame; "
                   "cropped with SyncTalk_2D's formula; no face detection")
@click.option("--smooth", is_flag=True,
              help="SyncTalk_2D dataset: smooth the rectangles over time (default: exactly SyncTalk_2D's crops)")
@click.option("--frame-format", type=click.Choice(["jpg", "png"]), default="jpg", show_default=True,
              help="video: how the frames are stored (jpg quality 95, as SyncTalk_2D stores its datasets' frames; "
                   "png lossless, about 6x larger and 16x slower to write at 720p)")
@click.pass_context
def avatar_import(ctx: click.Context, source: Path, name: str, network: Path, audio_encoder: Path | None,
                  start: float, end: float | None, force: bool, detect_threshold: float, predictor: Path | None,
                  rects_file: Path | None, lms_file: Path | None, smooth: bool, frame_format: str) -> None:
    """Make avatar NAME under models_root from SOURCE: a video (decoded at 25 frames/s, the face's
    landmarks found in every frame, SyncTalk_2D's crop from them, smoothed over time) or a SyncTalk_2D
    dataset folder (full_body_img/ + landmarks/: its frames, and the rectangles SyncTalk_2D's
    inference crops). A video without one consistent face is refused, saying what was found.

    Nothing is left under models_root when it fails. Then: engine-ctl avatar check NAME.
    """
    from engine.avatars.disk import AvatarError
    from engine.avatars.importer import (
        import_synctalk,
        import_video,
        is_synctalk_dataset,
        read_user_points,
    )
    cfg = cfg_of(ctx)
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
                if rects_file or lms_file or predictor or detect_threshold:
                    raise click.UsageError("--rects/--landmarks/--predictor/--detect-threshold apply to videos; a "
                                           "SyncTalk_2D dataset's rectangles come from its landmarks")
                if not is_synctalk_dataset(source):
                    raise AvatarError(f"{source}: a folder, but not a SyncTalk_2D dataset (expected full_body_img/ "
                                      "and landmarks/ in it)")
                result = import_synctalk(cfg.models_dir, name, source, network, audio_encoder, progress=progress,
                                         smooth=smooth, **common)
            else:
                if smooth:
                    raise click.UsageError("--smooth applies to SyncTalk_2D datasets; a video's crops are always "
                                           "smoothed")
                if rects_file and lms_file:
                    raise click.UsageError("give --rects or --landmarks, not both")
                rects = read_user_points(rects_file, "rects") if rects_file else None
                lms = list(read_user_points(lms_file, "landmarks")) if lms_file else None
                result = import_video(cfg.models_dir, name, source, network, audio_encoder, progress=progress,
                                      detect_threshold=detect_threshold, predictor=predictor, rects=rects,
                                      landmarks=lms, frame_format=frame_format, **common)
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
    cfg = cfg_of(ctx)
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
