"""Write real media files with a real encoder (PyAV / FFmpeg): the synthetic corpus and test media.

Supported codec families are registered in :data:`CONTAINERS`: H.264/AAC in mp4 (the default), VP9/Opus
in webm, MJPEG/PCM in avi, MPEG-4 part 2/AAC in mkv.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from indexing.errors import ConfigError


@dataclass(frozen=True)
class ContainerSpec:
    """Codecs used for one container kind."""

    suffix: str
    video_codec: str
    audio_codec: str
    pix_fmt: str
    audio_format: str  # the sample format the audio encoder wants


CONTAINERS: dict[str, ContainerSpec] = {
    "mp4": ContainerSpec(".mp4", "libx264", "aac", "yuv420p", "fltp"),
    "webm": ContainerSpec(".webm", "libvpx-vp9", "libopus", "yuv420p", "flt"),
    "avi": ContainerSpec(".avi", "mjpeg", "pcm_s16le", "yuvj420p", "s16"),
    "mkv": ContainerSpec(".mkv", "mpeg4", "aac", "yuv420p", "fltp"),
}


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    *,
    fps: float = 30.0,
    pts_s: Iterable[float] | None = None,
    audio: np.ndarray | None = None,
    sample_rate: int = 16_000,
    container: str = "mp4",
    crf: int = 23,
    threads: int | None = None,
    options: dict[str, str] | None = None,
    audio_options: dict[str, str] | None = None,
) -> Path:
    """Encode frames (and optionally audio) into a real media file.

    Args:
        path: Output file; its parent folder is created.
        frames: RGB frames, each ``(H, W, 3)`` uint8 with even H and W; consumed lazily (streaming).
        fps: Nominal frame rate (e.g. 30, 25, 30000/1001).
        pts_s: Optional explicit presentation time of each frame in seconds, for variable frame rate.
        audio: Optional float waveform in [-1, 1], shape ``(channels, samples)``; ``None`` writes no
            audio track at all.
        sample_rate: Audio sample rate in Hz (e.g. 8000, 16000, 44100, 48000).
        container: One of :data:`CONTAINERS`.
        crf: x264/VP9 quality (lower is better).
        threads: Video encoder threads; ``None`` lets FFmpeg choose. x264 output depends on the thread
            count, so pass a fixed number (e.g. 1) where files must be byte-identical across machines.
        options: Extra video encoder options, e.g. ``{"preset": "veryfast"}`` for x264 or
            ``{"deadline": "realtime", "cpu-used": "8"}`` for VP9.
        audio_options: Extra audio encoder options, e.g. ``{"aac_coder": "fast"}``.

    Returns:
        The written path.

    Raises:
        ValueError: Unknown container or badly shaped input.
    """
    import av

    if container not in CONTAINERS:
        raise ConfigError(f"Unknown container {container!r}; available: {', '.join(CONTAINERS)}")
    spec = CONTAINERS[container]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    # A fine time base so variable-frame-rate pts survive; mjpeg/avi needs the frame rate itself.
    time_base = Fraction(1, rate.numerator * 1000 // rate.denominator) if pts_s is not None else 1 / rate
    pts_iter = iter(pts_s) if pts_s is not None else None

    # bitexact: no random Matroska segment UID and no muxer version string, so equal input gives equal bytes.
    with av.open(str(path), mode="w", options={"fflags": "+bitexact"}) as out:
        vstream = None
        astream = None
        frame_iter = iter(frames)
        first = next(frame_iter, None)
        if first is None:
            raise ConfigError("write_video needs at least one frame")
        h, w = first.shape[:2]
        if first.ndim != 3 or first.shape[2] != 3 or h % 2 or w % 2:
            raise ConfigError(f"frames must be (H, W, 3) with even H and W, got {first.shape}")
        vstream = out.add_stream(spec.video_codec, rate=rate)
        vstream.width, vstream.height, vstream.pix_fmt = w, h, spec.pix_fmt
        if spec.video_codec in ("libx264", "libvpx-vp9"):
            vstream.options = {"crf": str(crf)} | ({"b": "0"} if spec.video_codec == "libvpx-vp9" else {})
        if options:
            vstream.options = dict(vstream.options) | options
        if threads is not None:
            vstream.codec_context.thread_count = threads
        if pts_iter is not None:
            vstream.codec_context.time_base = time_base
            vstream.time_base = time_base
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim != 2 or audio.shape[0] not in (1, 2):
                raise ConfigError(
                    f"audio must be (channels, samples) with 1 or 2 channels, got {audio.shape}"
                )
            layout = "mono" if audio.shape[0] == 1 else "stereo"
            astream = out.add_stream(spec.audio_codec, rate=sample_rate, layout=layout)
            if audio_options:
                astream.options = dict(astream.options) | audio_options

        def frames_all():
            yield first
            yield from frame_iter

        for i, rgb in enumerate(frames_all()):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            if pts_iter is not None:
                vf.pts = round(next(pts_iter) / time_base)
                vf.time_base = time_base
            else:
                vf.pts = i
            for packet in vstream.encode(vf):
                out.mux(packet)
        for packet in vstream.encode():
            out.mux(packet)

        if astream is not None:
            _encode_audio(out, astream, audio, sample_rate, spec.audio_format)
    return path


def _encode_audio(out, astream, audio: np.ndarray, sample_rate: int, fmt: str) -> None:
    import av

    channels = audio.shape[0]
    layout = "mono" if channels == 1 else "stereo"
    block = 1024 if fmt != "flt" else 960  # libopus wants 20 ms frames at 48 kHz-compatible sizes
    clipped = np.clip(audio, -1.0, 1.0)
    for start in range(0, clipped.shape[1], block):
        chunk = clipped[:, start : start + block]
        if fmt == "s16":
            data = (chunk.T * 32767).astype(np.int16).reshape(1, -1)  # packed
        elif fmt == "flt":
            data = np.ascontiguousarray(chunk.T).reshape(1, -1)  # packed float
        else:  # fltp: planar float
            data = np.ascontiguousarray(chunk)
        af = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
        af.sample_rate = sample_rate
        af.pts = start
        for packet in astream.encode(af):
            out.mux(packet)
    for packet in astream.encode():
        out.mux(packet)
