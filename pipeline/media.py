"""Reading videos on the step grid (design.md §1): probe a file, stream its steps, or fetch a few steps.

* :func:`probe_video` inspects a file in a helper process (a hang or a decoder crash becomes a
  :class:`~indexing.errors.MediaError`) and returns a :class:`VideoInfo`.
* :func:`iter_step_batches` streams every step of a video as :class:`StepBatch` es; memory is bounded by
  one batch whatever the length (frames are decoded per batch, audio is decoded packet by packet). Its
  frames come from one forward PyAV pass paused between batches (``StepReader(one_pass=True,
  follow=True)``): exact on H.264 with open GOPs, where decord's seeks to a keyframe that is not an IDR
  picture return wrong pixels for the pictures that refer back past it.
* :func:`read_steps` (and :class:`StepReader` for many calls on one file) fetches a few steps for
  training loaders; the content is that of the stream for those steps. ``StepReader(one_pass=True)``
  decodes each read in one forward pass (PyAV, only the pictures the steps need; grouped clip loading).

Clock: ``t = 0`` is the start time of the video stream (the first frame's presentation time, which is
what decord measures from). Audio is put on the same clock by its own timestamps, so a track that starts
late gets zeros in front. Frames are chosen from demuxer timestamps (the last frame whose pts is at or
before ``t``, :func:`indexing.grid.frames_at`), so 25, 29.97, 30 fps and variable-frame-rate files share
one grid.

Pixels: decord decodes only the frames a batch needs and scales them with FFmpeg's swscale **bicubic**
filter (decord's ``scale=W:H`` filter graph; swscale widens the kernel when downscaling, so it
antialiases) straight to the size whose shorter side is ``size`` and whose longer side is
``round(long * size / short)`` (rotation metadata is applied first); the centre ``size x size`` window is
then cut at offset ``(long' - size) // 2``.

Audio: PyAV decodes the first audio stream; channels are averaged to mono; 16 kHz comes from torchaudio's
windowed-sinc resampler (``torchaudio.functional.resample`` defaults: Hann window, 6 zero crossings,
rolloff 0.99) run on chunks that start on a common sample grid with a margin wider than the filter, so
an output sample does not depend on how the track was cut into windows. A random read seeks, decodes
``AUDIO_PREROLL_S`` of warm-up and throws it away; it then matches the stream to within 1e-3 on
containers with sample-exact timestamps (mp4, avi), while mkv/webm store 1 ms timestamps, so there a
random read may sit up to 0.5 ms off the stream. Decoded audio that ends more than
``AUDIO_TRUNCATION_TOL_S`` before the stated duration (or loses that much to undecodable packets) raises
``MediaError("audio truncated: decoded X s of Y s")`` instead of passing zeros on.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from indexing.errors import ConfigError, MediaError
from indexing.grid import AUDIO_S, SAMPLE_RATE, STEP_S, TEACHER_FRAMES, frames_at, num_steps, teacher_times

log = logging.getLogger(__name__)

MAX_SIDE = 8192  # larger frames are refused as absurd (corrupt headers claim 65535x65535)
# Decoded audio may fall short of the stated duration by this much before it counts as truncated. The
# largest honest shortfalls are codec framing: AAC priming/padding (2048 samples = 0.26 s at 8 kHz), Opus
# pre-skip (80 ms), MP3 encoder delay (~0.1 s at low rates); 0.5 s is above all of them.
AUDIO_TRUNCATION_TOL_S = 0.5
# Video data may end this much before the duration the container states before it counts as truncated.
VIDEO_TRUNCATION_TOL_S = 0.5
AUDIO_PREROLL_S = 0.5  # decoded and thrown away before a random-access audio window (decoder warm-up)
_AUDIO_SEEK_AHEAD_S = 2.0  # a window further ahead than this seeks instead of decoding through
_AUDIO_JITTER_S = 0.002  # timestamp jitter ignored when laying decoded audio frames end to end
_PROBE_RECYCLE = 500  # a probe helper process is replaced after this many files (FFmpeg leaks)
_HEARTBEAT_S = 0.5  # the probe helper reports progress this often while it scans a long file


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learnt about a file; written into the feature store's video index.

    Attributes:
        path: The file.
        duration_s: From demuxer timestamps: last frame pts + that frame's duration (one average frame
            interval when the container gives none), measured from the video stream's start.
        fps: Average frame rate over the presented frames, ``(num_frames - 1) / (last pts - first pts)``.
        num_frames: Video frames (packets) in the file.
        width: Displayed width in pixels (after rotation metadata).
        height: Displayed height in pixels.
        has_audio: Whether the file has an audio stream with data.
        sample_rate: Source audio rate in Hz, 0 without audio.
        channels: Source audio channels, 0 without audio.
        audio_duration_s: Audio duration the stream (or, failing that, the container) states, 0 without.
        start_s: Absolute time of ``t = 0`` (the video stream's start) in the file's clock, seconds.
        audio_start_s: Absolute start time of the audio stream in the file's clock, seconds.
        video_codec: Decoder name, e.g. ``"h264"``.
        audio_codec: Decoder name, e.g. ``"aac"``; empty without audio.
    """

    path: str
    duration_s: float
    fps: float
    num_frames: int
    width: int
    height: int
    has_audio: bool
    sample_rate: int
    channels: int
    audio_duration_s: float
    start_s: float = 0.0
    audio_start_s: float = 0.0
    video_codec: str = ""
    audio_codec: str = ""

    @property
    def num_steps(self) -> int:
        """Steps covering the video, ``ceil(duration / step)`` (the last one padded)."""
        return num_steps(self.duration_s)

    def to_dict(self) -> dict:
        """Plain JSON-able dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VideoInfo:
        """Rebuild from :meth:`to_dict` output; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class StepBatch:
    """Consecutive or chosen steps of one video.

    Attributes:
        steps: ``(B,)`` int64 step indices.
        time_s: ``(B,)`` float64 step start times in seconds.
        frames: ``(B, size, size, 3)`` uint8 RGB, the frame on screen at each step start (shorter side
            scaled to ``size``, centre crop).
        audio: ``(B, 16000)`` float32 mono 16 kHz, 1 s from each step start, zeros past the end of the
            audio (all zeros for a file without audio).
        clips: ``(B, 16, size, size, 3)`` uint8 teacher clips (every other frame at 30 fps from the step
            start), or ``None`` when not asked for.
    """

    steps: np.ndarray
    time_s: np.ndarray
    frames: np.ndarray
    audio: np.ndarray
    clips: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.steps)


# ----------------------------------------------------------------------------------------------- probing


def probe_video(path: str | Path, *, timeout_s: float = 60.0) -> VideoInfo:
    """Inspect a video file: streams, frame timestamps, damage.

    The file is scanned packet by packet (no full decode: the first video and audio frames are decoded)
    by a helper process, reused across calls of one thread, so a decoder that hangs or crashes cannot
    take the caller with it.

    Args:
        path: The video file.
        timeout_s: Longest time the helper may go without progress (it reports progress while it scans
            a long file); it is then killed and the call fails with ``"decode timed out after N s"``.

    Returns:
        The file's :class:`VideoInfo`.

    Raises:
        MediaError: With a specific reason: ``"file not found"``, ``"is a directory"``,
            ``"empty file"``, ``"not a media file (...)"``, ``"truncated (...)"``, ``"corrupt ..."``,
            ``"no video stream"``, ``"shorter than one frame (...)"``, ``"zero duration (...)"``,
            ``"absurd dimensions WxH (...)"``, ``"audio truncated: ..."``,
            ``"decode timed out after N s"``, ``"decoder crashed (SIGSEGV)"``.
    """
    path = _check_path(path)
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s must be positive, got {timeout_s}")
    reply = _probe_child().request(str(path), timeout_s)
    if "error" in reply:
        raise MediaError(path, reply["error"])
    return VideoInfo.from_dict(reply["info"])


def _check_path(path: str | Path) -> Path:
    """Cheap checks done in the caller: the file exists, is a readable non-empty regular file."""
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "file not found")
    if path.is_dir():
        raise MediaError(path, "is a directory")
    if not path.is_file():  # FIFOs and devices would block a reader forever
        raise MediaError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty file")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise MediaError(path, "permission denied") from None
    except OSError as err:
        raise MediaError(path, f"cannot open ({err.strerror})") from None
    return path


def _stated_end_s(stream) -> float | None:
    """Where a stream header says the stream ends, in seconds on the file clock, or None if it does not.

    mp4 and avi state a duration from the stream start; matroska/webm (ffmpeg's muxer) a DURATION tag
    holding the end time.
    """
    if stream.duration is not None and stream.duration > 0 and stream.time_base:
        return float(((stream.start_time or 0) + stream.duration) * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag:
        match = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", tag.strip())
        if match:
            hours, minutes, seconds = match.groups()
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return None


def _best_video(container):
    """The video stream decord picks (FFmpeg's best), or None; cover art (attached pictures) is no video."""
    import av

    stream = container.streams.best("video")
    attached = getattr(getattr(av.stream, "Disposition", None), "attached_pic", None)
    if stream is not None and attached is not None and stream.disposition & attached:
        return None
    return stream


def _open_reason(path: str, err: Exception, logs: list) -> str:
    """Reason for a file FFmpeg cannot open at all."""
    messages = " ".join(entry[2].strip() for entry in logs)
    with open(path, "rb") as handle:
        head = handle.read(12)
    if "moov atom not found" in messages and head[4:8] == b"ftyp":  # an mp4 that lost its index (at the end)
        return "truncated (moov atom not found: the mp4 index is missing)"
    if "prematurely" in messages or "truncat" in messages.lower():
        return f"truncated ({messages})"
    detail = messages or getattr(err, "strerror", None) or str(err)
    return f"not a media file ({detail})"


def _log_reason(entry, at_s: float, frame: int) -> str:
    """Reason for an FFmpeg error logged while the file was scanned."""
    name, message = entry[1], entry[2].strip()
    lowered = message.lower()
    if "prematurely" in lowered or "truncat" in lowered or "partial file" in lowered:
        return f"truncated (data ends at {at_s:.2f} s: {message})"
    return f"corrupt data near frame {frame} ({at_s:.2f} s; {name}: {message})"


def _inspect(path: str, heartbeat: Callable[[], None] = lambda: None) -> VideoInfo:
    """Scan a file in the current process; the body of the probe helper.

    Raises:
        MediaError: For every defect found (see :func:`probe_video`).
    """
    import av
    import av.logging

    av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)  # the same message about the next file must be seen too
    with av.logging.Capture(local=False) as logs:
        try:
            container = av.open(path, metadata_errors="ignore")
        except av.error.FFmpegError as err:
            raise MediaError(path, _open_reason(path, err, list(logs))) from None
    with container:
        vstream = _best_video(container)
        if vstream is None:
            raise MediaError(path, "no video stream")
        astream = container.streams.best("audio")
        if vstream.codec_context is None:  # PyAV makes no context when FFmpeg has no decoder for the codec
            raise MediaError(path, "unsupported video codec (no decoder for it in this FFmpeg build)")
        coded_w, coded_h = vstream.codec_context.width, vstream.codec_context.height
        if coded_w <= 0 or coded_h <= 0:
            raise MediaError(path, f"corrupt video header (frame size {coded_w}x{coded_h})")
        if max(coded_w, coded_h) > MAX_SIDE:
            raise MediaError(path, f"absurd dimensions {coded_w}x{coded_h} (limit {MAX_SIDE})")
        vstream.codec_context.thread_count = 1
        scan = _scan_packets(path, container, vstream, astream, heartbeat)

        vpts = np.sort(np.asarray(scan["vpts"], dtype=np.int64))
        n_frames = len(vpts)
        if n_frames == 0:
            raise MediaError(path, "shorter than one frame (no video frames)")
        if scan["first_frame"] is None:
            raise MediaError(path, "corrupt video data at frame 0 (no frame decodes)")
        vtb = vstream.time_base
        vstart = vstream.start_time if vstream.start_time is not None else int(vpts[0])
        rel_s = (vpts - vstart).astype(np.float64) * (vtb.numerator / vtb.denominator)  # (F,)
        nominal = vstream.average_rate or vstream.guessed_rate or vstream.base_rate
        last_dur_s = float(scan["vlast_dur"] * vtb) if scan["vlast_dur"] else 0.0
        span_s = float(rel_s[-1] - rel_s[0])
        if n_frames >= 2:
            if span_s <= 0:
                raise MediaError(path, "zero duration (all frames share one timestamp)")
            fps = (n_frames - 1) / span_s
            interval_s = 1.0 / fps
            frame_s = last_dur_s if 0 < last_dur_s <= 10 * interval_s else interval_s
        else:
            fps = float(nominal) if nominal else 0.0
            frame_s = last_dur_s if last_dur_s > 0 else (1.0 / fps if fps > 0 else 0.0)
            if frame_s <= 0:
                raise MediaError(path, "zero duration (a single frame without duration or frame rate)")
            fps = fps or 1.0 / frame_s
        duration_s = float(rel_s[-1]) + frame_s
        if not math.isfinite(duration_s) or duration_s <= 0:
            raise MediaError(path, f"zero duration (timestamps give {duration_s} s)")

        advertised = vstream.frames or 0
        if advertised > 0 and n_frames < advertised - max(2, advertised // 200):
            raise MediaError(
                path, f"truncated or corrupt: only {n_frames} of {advertised} advertised video frames present"
            )
        start_s = float(vstart * vtb)
        stated_end = _stated_end_s(vstream)
        if stated_end is not None and start_s + duration_s < stated_end - VIDEO_TRUNCATION_TOL_S:
            stated_v = stated_end - start_s
            raise MediaError(path, f"truncated: video data ends at {duration_s:.2f} s of {stated_v:.2f} s")

        frame = scan["first_frame"]
        width, height = frame.width, frame.height
        if (getattr(frame, "rotation", 0) or 0) % 180 == 90:
            width, height = height, width
        data_end_s = start_s + duration_s

        has_audio = astream is not None and scan["a_first"] is not None
        sample_rate = channels = 0
        audio_duration_s = audio_start_s = 0.0
        audio_codec = ""
        if has_audio:
            atb = astream.time_base
            aframe = scan["first_audio"]
            if aframe is None:
                raise MediaError(path, "corrupt audio data (no audio frame decodes)")
            sample_rate = int(aframe.sample_rate)
            channels = int(aframe.layout.nb_channels)
            audio_codec = astream.codec_context.name
            first = astream.start_time if astream.start_time is not None else scan["a_first"]
            audio_start_s = float(first * atb)
            held_s = float(scan["a_end"] * atb) - audio_start_s  # what the packets cover
            data_end_s = max(data_end_s, audio_start_s + held_s)
            stated_end = _stated_end_s(astream)
            audio_duration_s = stated_end - audio_start_s if stated_end is not None else held_s
            if held_s < audio_duration_s - AUDIO_TRUNCATION_TOL_S:
                raise MediaError(
                    path, f"audio truncated: stream holds {held_s:.2f} s of {audio_duration_s:.2f} s"
                )
        elif astream is not None:
            stated_end = _stated_end_s(astream)
            first = astream.start_time if astream.start_time is not None else 0
            stated_a = stated_end - float(first * astream.time_base) if stated_end is not None else None
            if stated_a is not None and stated_a > AUDIO_TRUNCATION_TOL_S:
                raise MediaError(path, f"audio truncated: stream holds 0.00 s of {stated_a:.2f} s")

        if container.duration is not None and container.duration > 0:
            file_start_s = (container.start_time or 0) / 1e6
            stated_end_s = file_start_s + container.duration / 1e6
            if data_end_s < stated_end_s - VIDEO_TRUNCATION_TOL_S:
                raise MediaError(
                    path, f"truncated: data ends at {data_end_s:.2f} s of {stated_end_s:.2f} s stated"
                )

        if scan["damage"] is not None:
            raise MediaError(path, scan["damage"])
        return VideoInfo(
            path=str(path),
            duration_s=duration_s,
            fps=float(fps),
            num_frames=n_frames,
            width=int(width),
            height=int(height),
            has_audio=has_audio,
            sample_rate=sample_rate,
            channels=channels,
            audio_duration_s=float(audio_duration_s),
            start_s=start_s,
            audio_start_s=audio_start_s,
            video_codec=vstream.codec_context.name,
            audio_codec=audio_codec,
        )


def _scan_packets(path: str, container, vstream, astream, heartbeat: Callable[[], None]) -> dict:
    """Demux every packet of the video (and first audio) stream; decode only the first frame of each.

    Returns:
        ``vpts`` (video packet timestamps), ``vlast_dur`` (duration of the last one, stream ticks),
        ``first_frame``, ``first_audio`` (decoded frames or None), ``a_first``/``a_end`` (first audio pts
        and end of the last audio packet, audio ticks, None without audio packets), ``damage`` (reason for
        the first error FFmpeg logged or the first damaged packet, None if none; the scan goes on so that
        a truncated file is told from a corrupt one).

    Raises:
        MediaError: Read errors, video packets without timestamps.
    """
    import av
    import av.logging

    streams = [vstream] + ([astream] if astream is not None else [])
    vpts: list[int] = []
    out = {
        "vpts": vpts,
        "vlast_dur": 0,
        "first_frame": None,
        "first_audio": None,
        "a_first": None,
        "a_end": None,
        "damage": None,
    }
    last_beat = time.monotonic()
    at_s = 0.0
    with av.logging.Capture(local=False) as logs:
        seen = 0  # log entries already judged
        try:
            for packet in container.demux(streams):
                if packet.size == 0 and packet.pts is None:  # end-of-stream flush marker
                    continue
                _note_damage(out, logs[seen:], at_s, len(vpts))
                ts = packet.pts if packet.pts is not None else packet.dts
                if packet.stream.index == vstream.index:
                    if ts is None:
                        raise MediaError(path, f"corrupt video data at frame {len(vpts)} (no timestamp)")
                    if packet.is_corrupt and out["damage"] is None:
                        out["damage"] = f"corrupt video data at frame {len(vpts)} (damaged packet)"
                    vpts.append(int(ts))
                    out["vlast_dur"] = int(packet.duration or 0)
                    at_s = float(ts * packet.time_base)
                    if out["first_frame"] is None and len(vpts) <= 512:
                        out["first_frame"] = _first_decoded(packet)
                elif ts is not None:
                    end = int(ts) + int(packet.duration or 0)
                    out["a_first"] = int(ts) if out["a_first"] is None else min(out["a_first"], int(ts))
                    out["a_end"] = end if out["a_end"] is None else max(out["a_end"], end)
                    if out["first_audio"] is None:
                        out["first_audio"] = _first_decoded(packet)
                seen = len(logs)  # decoders complain about benign things (e.g. a stream opening mid-GOP)
                now = time.monotonic()
                if now - last_beat > _HEARTBEAT_S:
                    heartbeat()
                    last_beat = now
        except av.error.FFmpegError as err:
            raise MediaError(path, f"truncated or unreadable at {at_s:.2f} s ({err})") from None
        _note_damage(out, logs[seen:], at_s, len(vpts))
        if out["first_frame"] is None and vpts:
            out["first_frame"] = _first_decoded(None, stream=vstream)  # frames held back by the decoder
        if out["first_audio"] is None and astream is not None and out["a_first"] is not None:
            out["first_audio"] = _first_decoded(None, stream=astream)
    return out


def _note_damage(out: dict, entries: list, at_s: float, frame: int) -> None:
    """Keep the reason for the first error-level FFmpeg log entry among ``entries``."""
    import av.logging

    for entry in entries:
        if entry[0] <= av.logging.ERROR and out["damage"] is None:
            out["damage"] = _log_reason(entry, at_s, frame)


def _first_decoded(packet, stream=None):
    """First frame a packet (or, with ``packet=None``, a decoder flush) yields; None if none or error."""
    import av

    try:
        frames = packet.decode() if packet is not None else stream.codec_context.decode(None)
    except av.error.FFmpegError:
        return None
    return frames[0] if frames else None


# ------------------------------------------------------------------------------- the probe helper process


class _ProbeChild:
    """A long-lived ``python`` process running :func:`_probe_server`; one per thread that probes."""

    def __init__(self):
        root = str(Path(__file__).resolve().parent.parent)  # the folder holding ``pipeline/``
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from pipeline.media import _probe_server; _probe_server()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            bufsize=0,
        )
        self.owner_pid = os.getpid()
        self.uses = 0
        self._buf = bytearray()
        _CHILDREN.add(self)

    def alive(self) -> bool:
        return self.proc.poll() is None and self.owner_pid == os.getpid() and self.uses < _PROBE_RECYCLE

    def request(self, path: str, timeout_s: float) -> dict:
        """Send one path, wait for its reply; kill the helper on timeout."""
        self.uses += 1
        try:
            self.proc.stdin.write((json.dumps({"path": path}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            return self._died(path)
        fd = self.proc.stdout.fileno()
        now = time.monotonic()
        deadline, hard_deadline = now + timeout_s, now + 30 * timeout_s
        while True:
            newline = self._buf.find(b"\n")
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[: newline + 1]
                reply = json.loads(line)
                if "progress" in reply:
                    deadline = min(time.monotonic() + timeout_s, hard_deadline)
                    continue
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close(kill=True)
                raise MediaError(path, f"decode timed out after {timeout_s:g} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    return self._died(path)
                self._buf += data

    def _died(self, path: str) -> dict:
        code = self.proc.wait()
        self.close(kill=True)
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return {"error": f"decoder crashed ({name})"}
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        return {"error": f"probe helper exited with code {code} ({tail[0]})"}

    def close(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self._stderr.close()
        _CHILDREN.discard(self)


_CHILDREN: weakref.WeakSet[_ProbeChild] = weakref.WeakSet()
_LOCAL = threading.local()


def _probe_child() -> _ProbeChild:
    child = getattr(_LOCAL, "child", None)
    if child is None or not child.alive():
        if child is not None and child.owner_pid == os.getpid():
            child.close()
        child = _LOCAL.child = _ProbeChild()
    return child


@atexit.register
def _close_children() -> None:
    for child in list(_CHILDREN):
        if child.owner_pid == os.getpid():
            child.close()


def _probe_server() -> None:
    """Main loop of the probe helper: one JSON request per line on stdin, replies on stdout."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a C library prints goes to stderr, never into the reply channel

    def heartbeat() -> None:
        channel.write('{"progress": 1}\n')

    for line in sys.stdin:
        path = json.loads(line)["path"]
        try:
            reply = {"info": _inspect(path, heartbeat).to_dict()}
        except MediaError as err:
            reply = {"error": err.reason}
        except Exception as err:  # noqa: BLE001 - any failure is a reason for this one file
            reply = {"error": f"unreadable ({type(err).__name__}: {err})"}
        channel.write(json.dumps(reply) + "\n")


# ------------------------------------------------------------------------------------------ step reading


def iter_step_batches(
    path: str | Path,
    *,
    batch_steps: int = 64,
    with_clips: bool = False,
    size: int = 112,
    info: VideoInfo | None = None,
    num_threads: int = 1,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[StepBatch]:
    """Stream the steps ``[start, stop)`` of a video (default all), ``batch_steps`` at a time.

    Memory is one batch whatever the video length: frames are decoded per batch (only the frames the
    batch needs), audio packet by packet keeping only the current batch's window. The readers are closed
    when the iteration ends, fails or is abandoned.

    Args:
        path: The video file.
        batch_steps: Steps per batch (the last batch may be shorter).
        with_clips: Also decode the 16-frame teacher clip of each step.
        size: Output side in pixels (shorter side scaled to ``size``, centre crop).
        info: The file's :class:`VideoInfo` if already probed (saves a probe).
        num_threads: Decoder threads (1 suits many workers per machine).
        start: First step to read (a task holding a piece of a video reads only its range).
        stop: End step (exclusive); ``None`` is the end of the video.

    Yields:
        :class:`StepBatch` es covering steps ``start .. stop - 1`` in order. Batches keep the grid of a
        whole-video read (multiples of ``batch_steps`` from step 0), cut at ``start`` and ``stop``, so a
        range reads the same steps in the same batches as the whole video would, except at its ends.

    Raises:
        MediaError: Unreadable file (see :func:`probe_video`), ``"corrupt video data at frame N"``,
            ``"audio truncated: decoded X s of Y s"``.
    """
    if batch_steps < 1:
        raise ConfigError(f"batch_steps must be >= 1, got {batch_steps}")
    info = info if info is not None else probe_video(path)
    total = info.num_steps if stop is None else stop
    if not 0 <= start <= total <= info.num_steps:
        raise ConfigError(f"steps [{start}, {total}) are not inside {path}'s {info.num_steps} steps")
    # One pass that goes on across batches: exact on open GOPs (decord's seeks there return wrong pixels for
    # pictures that refer back past the keyframe it seeks to), with no decoder running between batches.
    reader = StepReader(path, info=info, size=size, num_threads=num_threads, one_pass=True, follow=True)
    with reader:
        first = start
        while first < total:
            end = min((first // batch_steps + 1) * batch_steps, total)  # the whole-video batch grid
            yield reader.read(np.arange(first, end), with_clips=with_clips)
            first = end


def read_steps(
    path: str | Path,
    steps: Sequence[int],
    *,
    with_clips: bool = False,
    size: int = 112,
    info: VideoInfo | None = None,
    num_threads: int = 1,
) -> StepBatch:
    """Read a few steps of a video (random access for training loaders).

    The content equals that of :func:`iter_step_batches` for the same steps (one forward pass from where
    decoding the first frame exactly may start, exact on open GOPs as the extraction is). Each call opens the
    file; for many reads of one file keep a :class:`StepReader` open instead.

    Args:
        path: The video file.
        steps: Step indices in ``[0, info.num_steps)``, any order, repeats allowed; returned in this order.
        with_clips: Also decode the teacher clips.
        size: Output side in pixels.
        info: The file's :class:`VideoInfo` if already probed.
        num_threads: Decoder threads.

    Returns:
        A :class:`StepBatch` with ``B = len(steps)``.

    Raises:
        MediaError: As :func:`iter_step_batches`.
        IndexError: A step outside the video.
    """
    info = info if info is not None else probe_video(path)
    with StepReader(path, info=info, size=size, num_threads=num_threads, one_pass=True) as reader:
        return reader.read(steps, with_clips=with_clips)


def read_step_frames(path: str | Path, steps: Sequence[int]) -> np.ndarray:
    """The 112 x 112 frames at the starts of ``steps`` of one video (``l2l show``).

    Returns:
        ``(len(steps), 112, 112, 3)`` uint8, in the order of ``steps``.

    Raises:
        MediaError: The video cannot be read.
        IndexError: A step outside the video.
    """
    return read_steps(path, steps).frames  # (len(steps), 112, 112, 3)


class StepReader:
    """An open video (decord) and audio (PyAV) reader pair serving steps of one file.

    Use as a context manager (or call :meth:`close`): decord readers left open can hang the interpreter
    at exit.

    Args:
        path: The video file.
        info: Its :class:`VideoInfo` (probed if omitted).
        size: Output side in pixels.
        num_threads: Decoder threads.
        one_pass: Decode each :meth:`read`'s frames in one forward pass from the keyframe before its first
            frame, converting only the frames returned, with no decoder running between reads (PyAV, the
            same pixels as decord's): for reads of sorted steps spread over the video, as grouped clip
            loading makes (about half the CPU of decord's random access there, measured), and for single
            random steps as clip-order loading makes (3-5x the clips/s of an open decord reader on closed
            GOPs, measured). ``False``: decord's random access, which returns wrong pixels on open GOPs
            (H.264 keyframes that are not IDR pictures): nothing in the library reads that way any more.
        follow: With ``one_pass``, for reads in step order (each read's steps after the previous read's,
            as :func:`iter_step_batches` makes): the decoder pauses after a read and the next one goes on from
            there instead of seeking back to the IDR picture or recovery point before its first frame (an
            open-GOP file without recovery points may have a single IDR picture, at frame 0). A read out of
            order starts a fresh pass (exact, slower).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        info: VideoInfo | None = None,
        size: int = 112,
        num_threads: int = 1,
        one_pass: bool = False,
        follow: bool = False,
    ):
        if size < 1:
            raise ConfigError(f"size must be >= 1, got {size}")
        self.path = _check_path(path)
        self.info = info if info is not None else probe_video(path)
        self.size = size
        if follow and not one_pass:
            raise ConfigError("follow=True needs one_pass=True (it continues the one-pass decoder)")
        self.follow = follow
        if one_pass:
            self._video = _PassSource(self.path, self.info, size, num_threads, follow=follow)
        else:
            self._video = _VideoSource(self.path, self.info, size, num_threads)
        try:
            self._audio = _AudioSource(self.path, self.info) if self.info.has_audio else None
        except BaseException:
            self._video.close()
            raise

    def __enter__(self) -> StepReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the decoders (safe to call twice)."""
        self._video.close()
        if self._audio is not None:
            self._audio.close()

    def longest_read_frames(self) -> int:
        """With ``one_pass``: the most frames a read of one frame may decode, from the picture it must
        start at (an IDR picture or exact recovery point in H.264) to that frame: about one GOP on closed
        GOPs, two on open GOPs with recovery points (x264's), up to the whole video on an open-GOP file with
        neither. From the cached packet index; nothing is decoded.

        Raises:
            ConfigError: The reader is not ``one_pass``.
        """
        if not isinstance(self._video, _PassSource):
            raise ConfigError("longest_read_frames needs one_pass=True (decord's seeks plan differently)")
        return self._video.longest_read_frames()

    def read(self, steps: Sequence[int] | np.ndarray, *, with_clips: bool = False) -> StepBatch:
        """Frames, audio and optionally teacher clips of the given steps (see :func:`read_steps`)."""
        steps = np.asarray(steps, dtype=np.int64).reshape(-1)
        total = self.info.num_steps
        if steps.size and (steps.min() < 0 or steps.max() >= total):
            raise IndexError(f"{self.path}: steps must lie in [0, {total}), got {steps.min()}..{steps.max()}")
        start_s = steps.astype(np.float64) * STEP_S  # (B,)
        size = self.size
        n_audio = int(round(AUDIO_S * SAMPLE_RATE))
        if not steps.size:
            clips = np.zeros((0, TEACHER_FRAMES, size, size, 3), np.uint8) if with_clips else None
            empty = np.zeros((0, size, size, 3), np.uint8)
            return StepBatch(steps, start_s, empty, np.zeros((0, n_audio), np.float32), clips)
        frame_idx = frames_at(self._video.rel_pts, start_s)  # (B,)
        keep_from = None  # following reads (steps after these) want no frame before this index
        if self.follow and int(steps.max()) + 1 < total:
            keep_from = int(frames_at(self._video.rel_pts, np.array([(int(steps.max()) + 1) * STEP_S]))[0])
        if with_clips:
            clip_idx = frames_at(self._video.rel_pts, teacher_times(start_s).reshape(-1))  # (B*16,)
            pixels = self._video.frames(np.concatenate([frame_idx, clip_idx]), keep_from)
            frames = pixels[: len(steps)]
            clips = pixels[len(steps) :].reshape(len(steps), TEACHER_FRAMES, size, size, 3)
        else:
            frames, clips = self._video.frames(frame_idx, keep_from), None
        audio = np.zeros((len(steps), n_audio), dtype=np.float32)  # (B, 16000)
        if self._audio is not None:
            starts = np.rint(start_s * SAMPLE_RATE).astype(np.int64)  # (B,) first 16 kHz sample of each step
            order = np.argsort(starts, kind="stable")
            # Steps whose windows lie close together share one decode; far apart ones are read separately.
            breaks = np.flatnonzero(np.diff(starts[order]) > 2 * SAMPLE_RATE) + 1
            for group in np.split(order, breaks):
                lo = int(starts[group[0]])
                window = self._audio.window(lo, int(starts[group[-1]]) + n_audio)
                for j in group:
                    audio[j] = window[starts[j] - lo : starts[j] - lo + n_audio]
        return StepBatch(steps=steps, time_s=start_s, frames=frames, audio=audio, clips=clips)


def _scaled_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Decoder output size (W', H') whose shorter side is ``size``; the longer one keeps the aspect."""
    if width <= height:
        return size, max(size, int(round(height * size / width)))
    return max(size, int(round(width * size / height))), size


def _torch_before_decord() -> None:
    """Load torch before decord. With decord loaded first, torch's convolutions crash the process
    (SIGSEGV; reproduced with torch 2.11 / decord2 3.4: ``import decord, torch`` then a ResNet forward), and
    every process that decodes steps here also runs the students."""
    import torch  # noqa: F401


def preload_decoders() -> None:
    """Import the decoders (decord, PyAV) in this process now, so DataLoader workers forked later start with
    them loaded instead of each paying the import (~0.3 s of dynamic loading per worker and epoch)."""
    _torch_before_decord()
    import av  # noqa: F401
    import decord  # noqa: F401


class _VideoSource:
    """decord reader scaled for the centre crop, with float64 frame times from the demuxer."""

    def __init__(self, path: Path, info: VideoInfo, size: int, num_threads: int):
        _torch_before_decord()
        import decord
        from decord.video_reader import _CAPI_VideoReaderFree

        _DECORD_FREE[:] = [_CAPI_VideoReaderFree]
        self.path = path
        self.size = size
        self.out_w, self.out_h = _scaled_size(info.width, info.height, size)
        self.x0, self.y0 = (self.out_w - size) // 2, (self.out_h - size) // 2
        self.num_threads = num_threads
        # decord keeps timestamps as float32 (0.9 ms steps at 2 h: enough to pick the wrong frame), so
        # the frame times come from the demuxer in float64, in decord's order (sorted pts).
        self.rel_pts = _video_times(path)  # (F,)
        self.vr = None
        try:
            self.vr = decord.VideoReader(
                str(path), width=self.out_w, height=self.out_h, num_threads=num_threads
            )
        except Exception as err:  # noqa: BLE001 - decord raises RuntimeError/DECORDError/AssertionError
            raise MediaError(path, f"decoder failed to open the video ({_short(err)})") from None
        if len(self.vr) != len(self.rel_pts):
            count = len(self.vr)
            self.close()
            raise MediaError(path, f"decoder sees {count} frames but the demuxer {len(self.rel_pts)}")
        decord_s = self.vr.get_frame_timestamp(np.arange(len(self.vr)))[:, 0]  # (F,) float32, no decoding
        if np.abs(decord_s - self.rel_pts).max() > 5e-3:  # frame i must mean the same frame to both
            self.close()
            raise MediaError(path, "decoder and demuxer disagree on frame times")

    def frames(self, indices: np.ndarray, keep_from: int | None = None) -> np.ndarray:
        """Decode frames by index: ``(N, size, size, 3)`` uint8, only the distinct indices are decoded
        (``keep_from``: see :meth:`_PassSource.frames`; decord's reader needs no such hint)."""
        unique, inverse = np.unique(indices, return_inverse=True)
        try:
            batch = self.vr.get_batch(unique.tolist()).asnumpy()  # (U, H', W', 3)
        except Exception as err:  # noqa: BLE001
            bad = self._first_bad(unique)
            raise MediaError(self.path, f"corrupt video data at frame {bad} ({_short(err)})") from None
        if batch.shape != (len(unique), self.out_h, self.out_w, 3):
            raise MediaError(
                self.path,
                f"decoder returned frames of shape {batch.shape[1:]}, expected {(self.out_h, self.out_w, 3)}",
            )
        crop = batch[:, self.y0 : self.y0 + self.size, self.x0 : self.x0 + self.size]
        return crop[inverse.reshape(-1)]  # fancy indexing copies: (N, size, size, 3), contiguous

    def _first_bad(self, unique: np.ndarray) -> int:
        """First of these frame indices a fresh reader cannot decode (for the error message)."""
        import decord

        vr = None
        try:
            vr = decord.VideoReader(str(self.path), width=self.out_w, height=self.out_h, num_threads=1)
            for index in unique.tolist():
                try:
                    vr.get_batch([index])
                except Exception:  # noqa: BLE001
                    return int(index)
        except Exception:  # noqa: BLE001
            pass
        finally:
            _free_reader(vr)
        return int(unique[0])

    def close(self) -> None:
        _free_reader(self.vr)
        self.vr = None


class _NoPass(Exception):
    """The one-pass decoder cannot serve this read exactly as decord would; decord serves it."""


class _SeekMissed(_NoPass):
    """A seek did not land at or before the packet it aimed at: passes of this file start at frame 0."""


_SKIP_NONREF = ("h264", "hevc")  # codecs whose non-reference pictures are told apart before decoding


class _PassSource:
    """Frames decoded by PyAV in one forward pass per read, converted exactly as :class:`_VideoSource`.

    A read seeks to where decoding its frames exactly may start (:func:`_pass_starts`: in H.264 the IDR
    picture before its first frame, or on open GOPs a keyframe with an exact recovery point; other codecs: a
    keyframe) and decodes forward to its last one. Only the frames it returns go through the filter graph
    decord uses (``scale=W:H,format=rgb24``, the same FFmpeg build: the same pixels, tested). Pictures no
    returned frame depends on are not decoded: H.264/HEVC non-reference pictures, and in H.264 the packets
    between a segment's last wanted frame and the next IDR picture (nothing after an IDR refers to what lies
    before it), so whole GOPs without a wanted frame are only demuxed. No decoder thread runs between reads
    (an open decord reader keeps decoding ahead).

    Whatever this path cannot serve exactly (rotation metadata, packets without distinct pts, packets that
    differ from the index, a frame that does not come out, a decoder error) is read by decord instead, so
    damage is reported as :class:`_VideoSource` reports it.
    """

    def __init__(self, path: Path, info: VideoInfo, size: int, num_threads: int, *, follow: bool = False):
        self.path = path
        self.info = info
        self.size = size
        self.num_threads = num_threads
        self.follow = follow
        self.out_w, self.out_h = _scaled_size(info.width, info.height, size)
        self.x0, self.y0 = (self.out_w - size) // 2, (self.out_h - size) // 2
        self.index = _video_index(path)
        self.rel_pts = self.index.rel_s  # (F,)
        self._decord: _VideoSource | None = None
        self.decord_reads = 0  # reads decord served (the pass could not serve them exactly)
        # follow mode: the decoder paused between reads, the crops of frames that came out at or after the
        # previous read's keep mark (pts -> (size, size, 3)), and that mark (later reads want nothing before)
        self._live: _LivePass | None = None
        self._held: dict[int, np.ndarray] = {}
        self._keep_tick: int | None = None
        self.restarts = 0  # follow mode: passes started (the first read's included)
        self._order = None  # (F,) decode positions in pts order, with what _first needs (see _positions)

    def frames(self, indices: np.ndarray, keep_from: int | None = None) -> np.ndarray:
        """Frames by index: ``(N, size, size, 3)`` uint8, as :meth:`_VideoSource.frames`.

        Args:
            indices: Frame indices, any order, repeats allowed.
            keep_from: Follow mode: the next read wants no frame before this index (``None``: there is no
                next read), so frames from it on that come out now are kept for it and are decoded in full.
        """
        import av

        unique, inverse = np.unique(indices, return_inverse=True)
        if self._decord is None:
            if not len(unique):
                return np.zeros((0, self.size, self.size, 3), np.uint8)
            try:
                try:
                    return self._any_pass(unique, keep_from)[inverse.reshape(-1)]  # (N, size, size, 3)
                except _SeekMissed:  # this file's seeks miss: every pass starts at frame 0 from now on
                    self._stop()
                    self._first_at = np.zeros_like(self._first_at)
                    return self._any_pass(unique, keep_from)[inverse.reshape(-1)]  # (N, size, size, 3)
            except (_NoPass, av.error.FFmpegError) as err:
                self._stop()
                if not _decord_seeks_exact(self.index):
                    log.warning(
                        "%s: read by decord's seeks (the one-pass decoder cannot: %s), which may give wrong "
                        "pixels here: its keyframes are not all H.264 IDR pictures (open GOPs or another "
                        "codec); check this file's frames, or re-encode it with closed GOPs",
                        self.path,
                        _short(err),
                    )
                self._decord = _VideoSource(self.path, self.info, self.size, self.num_threads)
        self.decord_reads += 1
        return self._decord.frames(indices)

    def _any_pass(self, unique: np.ndarray, keep_from: int | None) -> np.ndarray:
        """The frames ``unique`` by a following pass in follow mode, a fresh one otherwise."""
        return self._follow_pass(unique, keep_from) if self.follow else self._pass(unique)

    def _follow_pass(self, unique: np.ndarray, keep_from: int | None) -> np.ndarray:
        """The frames ``unique`` (sorted, distinct indices), going on with the paused decoder where that is
        exact: ``(U, size, size, 3)``.

        The decoder goes on when this read wants nothing before the previous read's keep mark (every frame
        from the mark on was decoded in full and either came out, and is held, or is still to come) and the
        start a fresh pass would take (:meth:`_plan`) is not ahead of the demuxer; otherwise a fresh pass
        starts there. Packets are decoded in full from the start on, except non-reference pictures that
        neither this read nor a later one wants (nothing refers to them).
        """
        index = self.index
        if not index.all_pts:
            raise _NoPass("packets without distinct pts")
        want = index.ticks[unique]  # (U,) sorted
        keep = int(index.ticks[keep_from]) if keep_from is not None else _NO_TICK
        out = np.empty((len(unique), self.size, self.size, 3), np.uint8)  # (U, size, size, 3)
        slot = {int(t): j for j, t in enumerate(want)}
        if self._keep_tick is None or int(want[0]) < self._keep_tick:  # wants what was let go: start afresh
            self._stop()
        for t in [t for t in slot if t in self._held]:
            out[slot.pop(t)] = self._held[t]
        held = {t: crop for t, crop in self._held.items() if t >= keep}
        self._keep_tick = keep
        if slot:
            first = self._first(self._positions(np.asarray(sorted(slot), np.int64)))
            live = self._live
            if live is None or first > live.at:  # a fresh pass from ``first`` decodes less (and is exact)
                if live is not None:
                    live.container.close()  # (what it held stays: exact pixels, kept by pts)
                    self._live = None
                live = self._start(first)
            ctx, graph = live.ctx, live.graph
            skip_nonref = ctx.name in _SKIP_NONREF
            ticks = live.ticks

            def take(frames) -> None:
                for frame in frames:
                    pts = frame.pts
                    j = slot.pop(pts, None)
                    if j is None and (pts is None or pts < keep):
                        continue
                    crop = self._crop(frame, ctx, graph)  # (size, size, 3)
                    if j is not None:
                        out[j] = crop
                    if pts >= keep:
                        held[pts] = crop

            while slot:
                if live.ended:
                    raise _NoPass(f"{len(slot)} frames did not come out")
                packet = next(live.packets, None)
                if packet is None or (packet.size == 0 and packet.pts is None):  # end of stream: drain
                    live.ended = True
                    take(ctx.decode(None))
                    continue
                if live.at >= len(ticks) or packet.pts != ticks[live.at]:
                    raise _NoPass("packets differ from the index (or the seek landed elsewhere)")
                live.at += 1
                if skip_nonref:
                    skip = packet.pts not in slot and packet.pts < keep
                    if skip != live.skipping:
                        ctx.skip_frame = "NONREF" if skip else "DEFAULT"
                        live.skipping = skip
                take(packet.decode())
        self._held = held
        if keep == _NO_TICK:  # no later read: nothing to pause for
            self._stop()
        return out

    def _crop(self, frame, ctx, graph) -> np.ndarray:
        """One decoded frame through the scale graph, centre-cropped: ``(size, size, 3)`` uint8.

        Raises:
            _NoPass: The frame is rotated or its format or size changed mid-stream (decord reads instead).
        """
        if getattr(frame, "rotation", 0) or frame.format.name != ctx.format.name:
            raise _NoPass("rotated or format changed mid-stream")
        if (frame.width, frame.height) != (ctx.width, ctx.height):
            raise _NoPass("frame size changed mid-stream")
        try:
            graph.vpush(frame)
            rgb = graph.vpull().to_ndarray()  # (out_h, out_w, 3)
        except BaseException:  # a graph left holding a frame must never serve another read
            for key in [k for k, g in _GRAPHS.items() if g is graph]:
                del _GRAPHS[key]
            raise
        return rgb[self.y0 : self.y0 + self.size, self.x0 : self.x0 + self.size]

    def _open_stream(self, container, first: int) -> tuple[Any, Any, Any]:
        """The decoder context, the packets from decode position ``first`` and the scale graph of the open
        ``container``'s video.

        Raises:
            _NoPass: No decodable video stream, or one whose coded size is not its displayed one (rotated).
        """
        stream = _best_video(container)
        if stream is None or stream.codec_context is None:
            raise _NoPass("no decodable video stream")
        ctx = stream.codec_context
        ctx.thread_count = self.num_threads
        if ctx.format is None or (ctx.width, ctx.height) != (self.info.width, self.info.height):
            raise _NoPass("rotated or unknown format")  # displayed size differs from coded: rotated
        packets = self._packets_from(container, stream, first)
        return ctx, packets, _scale_graph(stream, self.out_w, self.out_h)

    def _start(self, first: int) -> _LivePass:
        """Open the file and place its demuxer at decode position ``first`` (a keyframe)."""
        import av

        self.restarts += 1
        container = av.open(str(self.path), metadata_errors="ignore")
        try:
            ctx, packets, graph = self._open_stream(container, first)
        except BaseException:
            container.close()
            raise
        self._live = _LivePass(container, ctx, graph, packets, self.index.decode_ticks.tolist(), first)
        return self._live

    def _packets_from(self, container, stream, first: int) -> Iterator:
        """The video packets of an open file from decode position ``first`` (a start point) on.

        A seek that lands before ``first`` is walked forward, demuxing only; one that lands after it is tried
        again from 1 s and 4 s earlier (MPEG-TS has no index: its seeks go by decode timestamps, which come
        before the presentation timestamps the index knows).

        Raises:
            _SeekMissed: No seek landed at or before ``first`` on a packet the index knows.
        """
        if not first:
            return container.demux(stream)
        ticks = self.index.decode_ticks
        second = max(1, int(round(1 / float(stream.time_base))))  # 1 s in stream ticks
        for back_s in (0, 1, 4):
            container.seek(int(ticks[first]) - back_s * second, stream=stream, backward=True)
            packets = container.demux(stream)
            head = next(packets, None)
            if head is None or head.pts is None:
                continue
            landed = int(self._positions(np.array([head.pts]))[0])
            if landed > first or ticks[landed] != head.pts:
                continue
            while landed < first:  # packets before the start point: demuxed, never decoded
                head = next(packets, None)
                landed += 1
                if head is None or head.pts != ticks[landed]:
                    raise _SeekMissed(f"packets after a seek to position {first} differ from the index")
            return itertools.chain([head], packets)
        raise _SeekMissed(f"no seek landed at or before position {first}")

    def _stop(self) -> None:
        """Close the paused decoder, if any, and forget what it held."""
        if self._live is not None:
            self._live.container.close()
            self._live = None
        self._held = {}

    def _plan(self, want: np.ndarray) -> tuple[int, np.ndarray]:
        """Where decoding starts and which packets it decodes, for the wanted pts ``want`` (sorted).

        Returns:
            ``(first, decode)``: the decode position of the keyframe to start at, and ``(F,)`` bool, the
            packets to decode (the others are only demuxed).
        """
        index = self.index
        pos = self._positions(want)  # (U,) decode positions
        first = self._first(pos)
        segment = np.cumsum(index.clean)  # (F,) segments start at IDR pictures
        last = np.full(int(segment[-1]) + 1, -1, np.int64)  # last wanted decode position per segment
        np.maximum.at(last, segment[pos], pos)
        decode = np.arange(len(segment)) <= last[segment]  # (F,)
        decode[:first] = False
        if index.recovery.any() or not index.clean.any():  # no IDR picture ends these GOPs; start points do
            decode &= self._groups(pos)
        return first, decode

    def _groups(self, pos: np.ndarray) -> np.ndarray:
        """``(F,)`` bool: the packets from each group's start point to its last wanted one, where wanted
        positions ``pos`` are grouped so that no later one needs decoding from before a group's last one (a
        pass then skips to the next group's start point instead of decoding the packets in between)."""
        wanted = np.sort(pos)  # (U,)
        need = np.minimum.accumulate(self._first_at[wanted][::-1])[::-1]  # (U,) earliest start from here on
        begins = np.concatenate([[True], need[1:] > wanted[:-1]])  # (U,) a group begins here
        ends = np.concatenate([begins[1:], [True]])  # (U,) a group ends here
        edges = np.zeros(len(self._first_at) + 1, np.int64)  # (F + 1,) +1 at group starts, -1 past ends
        np.add.at(edges, need[begins], 1)
        np.add.at(edges, wanted[ends] + 1, -1)
        return np.cumsum(edges[:-1]) > 0

    def _positions(self, want: np.ndarray) -> np.ndarray:
        """Decode positions ``(U,)`` of the packets with pts ``want``."""
        if self._order is None:  # once per source: a long video's sort would cost per read otherwise
            order = np.argsort(self.index.decode_ticks, kind="stable")  # (F,)
            self._order, self._sorted_decode = order, self.index.decode_ticks[order]
            self._first_at = _pass_starts(self.index)  # (F,)
        return self._order[np.searchsorted(self._sorted_decode, want)]

    def _first(self, pos: np.ndarray) -> int:
        """The decode position where a pass that must decode positions ``pos`` exactly starts."""
        return int(self._first_at[pos].min())

    def longest_read_frames(self) -> int:
        """See :meth:`StepReader.longest_read_frames`."""
        self._positions(self.index.ticks[:1])  # the start points, computed once per source
        return int((np.arange(len(self._first_at)) - self._first_at).max()) + 1

    def _pass(self, unique: np.ndarray) -> np.ndarray:
        """The frames ``unique`` (sorted, distinct indices) in one forward decode: ``(U, size, size, 3)``."""
        import av

        index = self.index
        if not index.all_pts:
            raise _NoPass("packets without distinct pts")
        want = index.ticks[unique]  # (U,) sorted
        slot = {int(t): j for j, t in enumerate(want)}
        first, decode = self._plan(want)
        end = int(np.flatnonzero(decode)[-1])  # the last packet to decode; then the decoder is drained
        out = np.empty((len(unique), self.size, self.size, 3), np.uint8)  # (U, size, size, 3)
        with av.open(str(self.path), metadata_errors="ignore") as container:
            ctx, packets, graph = self._open_stream(container, first)
            skip_nonref = ctx.name in _SKIP_NONREF

            def take(frames) -> None:
                for frame in frames:
                    j = slot.pop(frame.pts, None)
                    if j is None:
                        continue
                    out[j] = self._crop(frame, ctx, graph)

            ticks, decode_at = index.decode_ticks.tolist(), decode.tolist()  # plain ints: a fast loop
            skipping = None
            at = first
            for packet in packets:
                if packet.size == 0 and packet.pts is None:  # end of stream
                    break
                if at >= len(ticks) or packet.pts != ticks[at]:
                    raise _NoPass("packets differ from the index (or the seek landed elsewhere)")
                if decode_at[at] and at > first and not decode_at[at - 1]:  # a group starts: as after a seek
                    take(ctx.decode(None))  # drain what the last group's pictures left in the decoder
                    ctx.flush_buffers()
                if decode_at[at]:
                    if skip_nonref and skipping != (packet.pts not in slot):
                        skipping = packet.pts not in slot
                        ctx.skip_frame = "NONREF" if skipping else "DEFAULT"
                    take(packet.decode())
                if at == end:
                    take(ctx.decode(None))  # drain: the frames the decoder still holds back
                    break
                at += 1
        if slot:
            raise _NoPass(f"{len(slot)} frames did not come out")
        return out

    def close(self) -> None:
        self._stop()
        if self._decord is not None:
            self._decord.close()
            self._decord = None


_NO_TICK = np.iinfo(np.int64).max  # keep mark of a read no later read follows


def _pass_starts(index: _VideoIndex) -> np.ndarray:
    """For each decode position, where a forward pass that decodes it exactly may start: ``(F,)`` int64.

    H.264: the last IDR picture at or before it (nothing after an IDR picture refers back past it, and no
    picture after it in decode order is shown before it). On open GOPs, also the last keyframe with an exact
    recovery point (:attr:`_VideoIndex.recovery`) before it whose picture is not shown after it, or the one
    before that one (a leading picture, shown before its keyframe, refers back into the GOP before): a random
    read then decodes about a GOP or two, not the video from its single IDR picture. Other codecs: the
    keyframe at or before it; where pictures are reordered, one keyframe earlier (open GOPs).
    """
    pts = index.decode_ticks  # (F,)
    pos = np.arange(len(pts))  # (F,)

    def last(points: np.ndarray, back: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The ``back``-th point before the last one at or before each position, and whether it exists."""
        k = np.searchsorted(points, pos, side="right") - 1 - back  # (F,)
        return points[np.maximum(k, 0)] if len(points) else np.zeros_like(pos), k >= 0

    if not index.clean.any():
        keys = np.flatnonzero(np.isin(pts, index.key_ticks))
        at, ok = last(keys, 1 if np.any(np.diff(pts) < 0) else 0)
        return np.where(ok, at, 0)
    at, ok = last(np.flatnonzero(index.clean))
    first = np.where(ok, at, 0)
    points = np.flatnonzero(index.clean | index.recovery)
    if not index.recovery.any() or np.any(np.diff(pts[points]) <= 0):  # shown out of order: IDR only
        return first
    for back in (1, 0):  # the later start point wins where it is exact
        at, ok = last(points, back)
        exact = ok & (index.clean[at] | (pts >= pts[at]))  # shown at or after its start (or after an IDR)
        first = np.where(exact & (at > first), at, first)
    return first


class _LivePass:
    """A one-pass decoder paused between reads (:meth:`_PassSource._follow_pass`): the open file, its
    demuxer's packet iterator and the decode position ``at`` of the next packet it yields."""

    def __init__(self, container, ctx, graph, packets, ticks: list, at: int):
        self.container, self.ctx, self.graph, self.packets = container, ctx, graph, packets
        self.ticks = ticks  # (F,) the packets' pts in decode order, plain ints (a fast loop)
        self.at = at
        self.skipping = None  # the skip_frame setting last given to the decoder (None: never set)
        self.ended = False  # the stream ended and the decoder was drained


_GRAPHS: OrderedDict[tuple, object] = OrderedDict()  # filter graphs of this process, by their arguments


def _scale_graph(stream, out_w: int, out_h: int):
    """decord's filter graph for ``stream`` (same buffer arguments, ``scale=W:H,format=rgb24``; one thread,
    the same pixels, tested); one per distinct set of arguments and process (scaling keeps no state between
    frames; building a graph and its first frame's scaler cost about as much as scaling 5 frames)."""
    import av.filter

    ctx = stream.codec_context
    tb, sar = stream.time_base, ctx.sample_aspect_ratio
    sar_text = f"{sar.numerator}/{sar.denominator}" if sar else "0/1"
    args = (
        f"video_size={ctx.width}x{ctx.height}:pix_fmt={ctx.format.name}:"
        f"time_base={tb.numerator}/{tb.denominator}:pixel_aspect={sar_text}"
    )
    key = (os.getpid(), args, out_w, out_h)  # a forked loader worker builds its own
    if key in _GRAPHS:
        _GRAPHS.move_to_end(key)
        return _GRAPHS[key]
    graph = av.filter.Graph()
    graph.threads = 1  # no thread pool (the default starts one per core): loader workers share the cores
    nodes = [
        graph.add("buffer", args),
        graph.add("scale", f"{out_w}:{out_h}"),
        graph.add("format", "rgb24"),
        graph.add("buffersink"),
    ]
    for a, b in zip(nodes[:-1], nodes[1:], strict=True):
        a.link_to(b)
    graph.configure()
    _GRAPHS[key] = graph
    while len(_GRAPHS) > 8:
        _GRAPHS.popitem(last=False)
    return graph


def _free_reader(vr) -> None:
    """Release a decord reader now instead of at garbage collection (avoids hangs at interpreter exit)."""
    if vr is None or getattr(vr, "_handle", None) is None:
        return
    _DECORD_FREE[0](vr._handle)
    vr._handle = None


_DECORD_FREE: list = []  # decord's C free function, bound when the first reader opens (no import at exit)


def _short(err: Exception) -> str:
    """Last meaningful line of a (possibly multi-line C++) error message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[-1] if lines else type(err).__name__
    return text[:200]


@dataclass(frozen=True)
class _VideoIndex:
    """What one demux of a video stream tells (no decoding), cached per process by :func:`_video_index`.

    Attributes:
        ticks: ``(F,)`` int64 sorted packet timestamps (pts, dts where a packet has none), stream ticks.
        rel_s: ``(F,)`` float64 the same as seconds from the stream start: frame ``i`` in decord's order.
        key_ticks: ``(K,)`` int64 sorted timestamps of the keyframes (where decoding can start).
        all_pts: Every packet had a pts and no two share one (a decoded frame's pts names its index).
        decode_ticks: ``(F,)`` int64 the packets' pts in decode (file) order.
        clean: ``(F,)`` bool per decode position: an H.264 IDR picture, which no later picture reaches
            past, so the packets before it that no wanted frame needs may go undecoded.
        recovery: ``(F,)`` bool per decode position: an H.264 keyframe that is no IDR picture but carries a
            recovery point SEI with ``recovery_frame_cnt`` 0 and ``exact_match_flag`` 1 (x264's open-GOP
            keyframes): decoding started there gives every picture shown at or after it exactly as a decode
            from the previous IDR picture would (H.264 Annex D, recovery point semantics).
    """

    ticks: np.ndarray
    rel_s: np.ndarray
    key_ticks: np.ndarray
    all_pts: bool
    decode_ticks: np.ndarray
    clean: np.ndarray
    recovery: np.ndarray


def _decord_seeks_exact(index: _VideoIndex) -> bool:
    """Whether decord's seeks give exact pixels on this file: only where every keyframe is an H.264 IDR
    picture (closed GOPs). They were measured wrong on H.264 open GOPs, x265's CRA pictures and MPEG-2 in
    MPEG-TS (shifted by 3 frames); other codecs' keyframes are not known to be clean, so they count as not."""
    return 0 < len(index.key_ticks) <= int(index.clean.sum())


def _nal_units(data: bytes, length_size: int) -> Iterator[bytes]:
    """The NAL units of an H.264 access unit in length-prefixed (mp4/mkv ``avcC``) form."""
    at = 0
    while at + length_size < len(data):
        size = int.from_bytes(data[at : at + length_size], "big")
        yield data[at + length_size : at + length_size + size]
        at += length_size + size


def _is_idr(data: bytes, length_size: int) -> bool:
    """Whether an H.264 access unit in length-prefixed (mp4/mkv ``avcC``) form holds an IDR slice."""
    return any(nal and nal[0] & 0x1F == 5 for nal in _nal_units(data, length_size))


def _is_exact_recovery_point(data: bytes, length_size: int) -> bool:
    """Whether an H.264 access unit holds a recovery point SEI message with ``recovery_frame_cnt`` 0 and
    ``exact_match_flag`` 1 (H.264 Annex D): the pictures shown from it on decode exactly when decoding
    starts at it."""
    for nal in _nal_units(data, length_size):
        if not nal or nal[0] & 0x1F != 6:
            continue
        rbsp = nal[1:].replace(b"\x00\x00\x03", b"\x00\x00")  # emulation prevention bytes out
        at = 0
        while at < len(rbsp) and rbsp[at] != 0x80:  # SEI messages until the trailing bits
            kind = size = 0
            while at < len(rbsp) and rbsp[at] == 0xFF:
                kind, at = kind + 255, at + 1
            kind, at = kind + (rbsp[at] if at < len(rbsp) else 0), at + 1
            while at < len(rbsp) and rbsp[at] == 0xFF:
                size, at = size + 255, at + 1
            size, at = size + (rbsp[at] if at < len(rbsp) else 0), at + 1
            if kind == 6 and size >= 1:
                # recovery_frame_cnt ue(v) is 0 exactly when its first bit is 1; exact_match_flag follows
                return at < len(rbsp) and rbsp[at] & 0xC0 == 0xC0
            at += size
    return False


# Per-process cache of video indexes, keyed by (path, size, mtime): persistent loader workers demux each
# video once, not once per epoch. Bounded by the frames it holds (26 bytes each: 52 MB).
_INDEX_CACHE: OrderedDict[tuple, _VideoIndex] = OrderedDict()
_INDEX_CACHE_FRAMES = 2_000_000
_INDEX_HELD = [0]  # frames the cache holds now


def _file_key(path: Path) -> tuple:
    """``(path, size, mtime)``: a file replaced or damaged since gets a new key."""
    st = os.stat(path)
    return (str(path), st.st_size, st.st_mtime_ns)


def _video_index(path: Path) -> _VideoIndex:
    """The video stream's :class:`_VideoIndex`, from the cache or one demux pass.

    Raises:
        MediaError: No video stream, no frames, a packet without timestamp, an unreadable file.
    """
    key = _file_key(path)
    if key in _INDEX_CACHE:
        _INDEX_CACHE.move_to_end(key)
        return _INDEX_CACHE[key]
    import av

    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = _best_video(container)
            if stream is None:
                raise MediaError(path, "no video stream")
            ctx = stream.codec_context
            extradata = (ctx.extradata or b"") if ctx is not None and ctx.name == "h264" else b""
            length_size = (extradata[4] & 3) + 1 if len(extradata) > 4 and extradata[0] == 1 else 0
            ticks, keys, clean, recovery, all_pts = [], [], [], [], True
            for p in container.demux(stream):
                if p.size == 0 and p.pts is None:  # end-of-stream flush marker
                    continue
                all_pts = all_pts and p.pts is not None
                ticks.append(p.pts if p.pts is not None else p.dts)
                if p.is_keyframe:
                    keys.append(ticks[-1])
                data = bytes(p) if length_size and p.is_keyframe else b""
                clean.append(bool(data) and _is_idr(data, length_size))
                recovery.append(bool(data) and not clean[-1] and _is_exact_recovery_point(data, length_size))
            if any(t is None for t in ticks):
                raise MediaError(path, "corrupt video data (packet without timestamp)")
            start = stream.start_time if stream.start_time is not None else min(ticks, default=0)
            tb = stream.time_base
    except av.error.FFmpegError as err:
        raise MediaError(path, f"truncated or unreadable ({err})") from None
    if not ticks:
        raise MediaError(path, "shorter than one frame (no video frames)")
    sorted_ticks = np.sort(np.asarray(ticks, dtype=np.int64))  # (F,)
    rel_s = (sorted_ticks - start).astype(np.float64) * (tb.numerator / tb.denominator)  # (F,)
    all_pts = all_pts and bool(np.all(np.diff(sorted_ticks) > 0))
    keys_sorted = np.unique(np.asarray(keys, np.int64))  # (K,)
    decode_ticks = np.asarray(ticks, np.int64)  # (F,) file order
    index = _VideoIndex(
        sorted_ticks,
        rel_s,
        keys_sorted,
        all_pts,
        decode_ticks,
        np.asarray(clean, bool),
        np.asarray(recovery, bool),
    )
    _INDEX_CACHE[key] = index
    _INDEX_HELD[0] += len(sorted_ticks)
    while _INDEX_HELD[0] > _INDEX_CACHE_FRAMES and len(_INDEX_CACHE) > 1:
        _INDEX_HELD[0] -= len(_INDEX_CACHE.popitem(last=False)[1].ticks)
    return index


def _video_times(path: Path) -> np.ndarray:
    """Sorted video frame times in float64 seconds from the stream start, as decord counts frames."""
    return _video_index(path).rel_s


class _AudioSource:
    """First audio stream decoded packet by packet to mono source-rate samples, resampled per window.

    Source samples are indexed on one grid, ``k = round((t - origin) * sr)``; 16 kHz output sample ``n``
    sits at source position ``n * sr / 16000``. A window is resampled from a chunk that starts and ends on
    whole resampler blocks (``sr / gcd`` source samples) with a margin wider than the filter, so its
    samples do not depend on how the track was cut into windows.
    """

    def __init__(self, path: Path, info: VideoInfo):
        import av

        self.path = path
        self.info = info
        self.sr = int(info.sample_rate)
        if self.sr <= 0:
            raise MediaError(path, "corrupt audio header (no sample rate)")
        g = math.gcd(self.sr, SAMPLE_RATE)
        self.up, self.down = SAMPLE_RATE // g, self.sr // g
        # torchaudio's filter reaches 6 zero crossings of the lower rate each side; keep 2 samples spare.
        reach = math.ceil(6 * self.sr / (min(self.sr, SAMPLE_RATE) * 0.99)) + 2
        self.margin_blocks = 0 if self.up == self.down else math.ceil(reach / self.down)
        self.origin_s = info.start_s
        self.start_k = round((info.audio_start_s - self.origin_s) * self.sr)
        self.stated_end_k = self.start_k + round(info.audio_duration_s * self.sr)
        self.tol_k = round(AUDIO_TRUNCATION_TOL_S * self.sr)
        self.jitter_k = max(2, math.ceil(_AUDIO_JITTER_S * self.sr))
        self.seek_ahead_k = round(_AUDIO_SEEK_AHEAD_S * self.sr)
        try:
            self.container = av.open(str(path), metadata_errors="ignore")
        except av.error.FFmpegError as err:
            raise MediaError(path, f"not a media file ({err})") from None
        self.stream = self.container.streams.best("audio")
        if self.stream is None:
            self.container.close()
            raise MediaError(path, "audio stream vanished since probing")
        self.tb_s = float(self.stream.time_base)
        self.packets = None  # demux iterator; None until decoding starts
        self.chunks: deque[np.ndarray] = deque()
        self.buf_k0 = 0  # source index of chunks[0][0]
        self.next_k: int | None = None  # source index after the last decoded sample
        self.valid_from = 0  # earliest source index the buffer speaks for since the last (re)start
        self.eof = False
        self.failed_s = 0.0  # duration of packets the decoder rejected

    def close(self) -> None:
        self.container.close()

    # --- public: one window of 16 kHz samples
    def window(self, n0: int, n1: int) -> np.ndarray:
        """16 kHz mono samples ``[n0, n1)`` on the video clock, ``(n1 - n0,)`` float32 (0 off the track)."""
        if self.up == self.down:
            return self._source(n0, n1)
        q0 = n0 // self.up - self.margin_blocks
        q1 = -(-n1 // self.up) + self.margin_blocks
        src = self._source(q0 * self.down, q1 * self.down)  # ((q1 - q0) * down,)
        out = _resample(src, self.sr)  # ((q1 - q0) * up,)
        lo = n0 - q0 * self.up
        return out[lo : lo + (n1 - n0)]

    # --- source samples
    def _source(self, k_a: int, k_b: int) -> np.ndarray:
        self._position(k_a)
        while not self.eof and (self.next_k is None or self.next_k < k_b):
            self._decode_next()
        if self.eof:
            self._check_end(k_b)
        while self.chunks and self.buf_k0 + len(self.chunks[0]) <= k_a:  # keep memory to this window
            self.buf_k0 += len(self.chunks.popleft())
            self.valid_from = max(self.valid_from, self.buf_k0)  # what was dropped must be decoded again
        out = np.zeros(k_b - k_a, dtype=np.float32)
        if self.chunks:
            data = np.concatenate(self.chunks)
            lo, hi = max(k_a, self.buf_k0), min(k_b, self.buf_k0 + len(data))
            if hi > lo:
                out[lo - k_a : hi - k_a] = data[lo - self.buf_k0 : hi - self.buf_k0]
        return out

    def _position(self, k_a: int) -> None:
        """Make sure decoding continues from at or before ``k_a``: start, go on, or seek."""
        if self.packets is not None:
            behind = k_a < self.valid_from
            far_ahead = not self.eof and self.next_k is not None and k_a > self.next_k + self.seek_ahead_k
            if not behind and not far_ahead:
                return
        preroll = round(AUDIO_PREROLL_S * self.sr)
        target = k_a - preroll
        if target <= self.start_k + preroll or not self._seek(target):
            self._restart(None)
            self.valid_from = -(2**62)

    def _restart(self, seek_ticks: int | None) -> None:
        """Decode afresh from the file start (``None``) or from a packet at or before ``seek_ticks``."""
        import av

        self.chunks.clear()
        self.next_k = None
        self.eof = False
        if self.packets is not None and seek_ticks is None:  # reopening is the one sure way back to the start
            self.container.close()
            try:
                self.container = av.open(str(self.path), metadata_errors="ignore")
            except av.error.FFmpegError as err:
                raise MediaError(self.path, f"not a media file any more ({err})") from None
            self.stream = self.container.streams.best("audio")
        elif seek_ticks is not None:
            self.container.seek(seek_ticks, stream=self.stream, backward=True)
            self.stream.codec_context.flush_buffers()
        self.packets = self.container.demux(self.stream)

    def _seek(self, target_k: int) -> bool:
        """Seek to a packet at or before source index ``target_k``; False if that did not work."""
        import av

        tb = self.stream.time_base
        ticks = int((self.origin_s + target_k / self.sr) / tb)
        try:
            self._restart(ticks)
        except av.error.FFmpegError:
            return False
        preroll = round(AUDIO_PREROLL_S * self.sr)
        while not self.eof and self.next_k is None:
            self._decode_next()
        if self.next_k is None or self.buf_k0 > target_k + preroll // 4:
            return False  # landed past the target (imprecise index): decode from the start instead
        self.valid_from = target_k + preroll // 2  # the decoder's warm-up garbage lies before this
        return True

    def _next_packet(self):
        """The next audio packet, or None at the end of the file (or where it stops being readable)."""
        import av

        try:
            return next(self.packets, None)
        except av.error.FFmpegError:  # unreadable from here on: the end check judges what is missing
            return None

    def _decode_next(self) -> None:
        import av

        packet = self._next_packet()
        if packet is None:
            self.eof = True
            return
        try:
            frames = packet.decode()
        except av.error.FFmpegError:
            lost = float(packet.duration * packet.time_base) if packet.duration else 1024 / self.sr
            self.failed_s += lost
            if self.failed_s > AUDIO_TRUNCATION_TOL_S:
                self._raise_truncated()
            return
        for frame in frames:
            self._place(frame)

    def _place(self, frame) -> None:
        if frame.sample_rate != self.sr:
            rates = f"{self.sr} -> {frame.sample_rate} Hz"
            raise MediaError(self.path, f"audio sample rate changes mid-stream ({rates})")
        samples = _to_mono(frame)  # (n,)
        k = None
        if frame.pts is not None:
            k = round((frame.pts * self.tb_s - self.origin_s) * self.sr)
        if self.next_k is None:
            self.next_k = self.buf_k0 = k if k is not None else self.start_k
        elif k is not None:
            shift = k - self.next_k
            if shift > self.jitter_k:  # a real gap in the timestamps: silence
                self.chunks.append(np.zeros(shift, dtype=np.float32))
                self.next_k += shift
            elif shift < -self.jitter_k:  # overlap: keep what is new
                samples = samples[-shift:]
        if len(samples):
            self.chunks.append(samples)
            self.next_k += len(samples)

    def _check_end(self, k_b: int) -> None:
        """At the end of the track: did it decode as far as it says it goes (where this window needs)?"""
        end_k = self.next_k if self.next_k is not None else self.start_k
        if end_k < min(k_b, self.stated_end_k) - self.tol_k:
            self._raise_truncated()

    def _raise_truncated(self) -> None:
        while not self.eof:  # finish decoding so the message tells how much there is
            packet = self._next_packet()
            if packet is None:
                break
            try:
                for frame in packet.decode():
                    self._place(frame)
                    self.chunks.clear()  # only the count matters now
            except Exception:  # noqa: BLE001
                self.failed_s += float(packet.duration * packet.time_base) if packet.duration else 0.0
        self.eof = True
        end_k = self.next_k if self.next_k is not None else self.start_k
        decoded_s = max(0.0, (end_k - self.start_k) / self.sr - self.failed_s)
        raise MediaError(
            self.path, f"audio truncated: decoded {decoded_s:.2f} s of {self.info.audio_duration_s:.2f} s"
        )


def _to_mono(frame) -> np.ndarray:
    """One decoded audio frame as mono float32 in [-1, 1]: the mean of its channels, ``(samples,)``."""
    channels = frame.layout.nb_channels
    if channels == 1 and frame.format.name in ("flt", "fltp"):  # AAC's, read in place (to_ndarray stacks)
        return np.frombuffer(frame.planes[0], np.float32, count=frame.samples).copy()
    data = frame.to_ndarray()  # planar (channels, n) or packed (1, n * channels)
    if channels == 1:
        mono = data.reshape(-1)
    elif frame.format.is_planar:
        mono = data.mean(axis=0)
    else:
        mono = data.reshape(-1, channels).mean(axis=1)
    if data.dtype == np.uint8:
        return ((mono - 128.0) / 128.0).astype(np.float32)
    if data.dtype.kind == "i":
        return (mono * (1.0 / 2 ** (8 * data.dtype.itemsize - 1))).astype(np.float32)
    return mono.astype(np.float32, copy=False)


@functools.lru_cache(maxsize=8)
def _resampler(sr: int):
    """torchaudio's sinc resampler to 16 kHz with its kernel built once per source rate."""
    import torchaudio.transforms

    return torchaudio.transforms.Resample(sr, SAMPLE_RATE)  # Hann window, 6 zero crossings, rolloff 0.99


def _resample(src: np.ndarray, sr: int) -> np.ndarray:
    """Source-rate mono samples to 16 kHz, ``(n,)`` -> ``(ceil(n * 16000 / sr),)`` float32."""
    import torch

    with torch.no_grad():
        out = _resampler(sr)(torch.from_numpy(np.ascontiguousarray(src))[None])
    return out[0].numpy()


__all__ = [
    "AUDIO_TRUNCATION_TOL_S",
    "MAX_SIDE",
    "StepBatch",
    "StepReader",
    "VideoInfo",
    "iter_step_batches",
    "probe_video",
    "read_steps",
]
