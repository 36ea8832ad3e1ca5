"""Input front ends: raw step samples (uint8 frames, 16 kHz waves, uint8 clips) to network tensors.

- Audio: log-mel spectrogram, 16 kHz mono, STFT with a 400-sample Hann window and hop 160 (centred,
  reflect-padded), 40 mel bands (HTK scale, 0-8 kHz, power 2), natural log with a floor of
  :data:`MEL_FLOOR`. One second of audio gives ``(1, 101, 40)`` = (channel, time, mel).
- Frames (image student): RGB scaled to [0, 1], then normalised with the ImageNet mean/std
  (:data:`IMAGE_MEAN`, :data:`IMAGE_STD`), the statistics torchvision's ResNet-18 was trained with.
- Clips (teacher): RGB scaled to [0, 1], normalised with the Kinetics-400 mean/std
  (:data:`KINETICS_MEAN`, :data:`KINETICS_STD`) that torchvision's ``r2plus1d_18`` expects, laid out
  ``(B, 3, T, H, W)``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from indexing.grid import SAMPLE_RATE

N_FFT = 400  # 25 ms Hann window
HOP = 160  # 10 ms
N_MELS = 40
MEL_FLOOR = 1e-6  # power floor before the log: silence (e.g. a video without audio) maps to log(1e-6)
MEL_FRAMES = 101  # frames in one second: 16000 / 160 + 1 (centred STFT)

IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet, RGB
IMAGE_STD = (0.229, 0.224, 0.225)
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)  # Kinetics-400, RGB (torchvision video models)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


@functools.lru_cache(maxsize=8)
def _mel_module(device: str) -> torch.nn.Module:
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE,
        n_fft=N_FFT,
        win_length=N_FFT,
        hop_length=HOP,
        n_mels=N_MELS,
        window_fn=torch.hann_window,
        power=2.0,
        center=True,
        pad_mode="reflect",
        mel_scale="htk",
    )
    return mel.to(device).eval()


def log_mel(wave: Tensor) -> Tensor:
    """Log-mel spectrogram of a batch of 1 s mono 16 kHz waves.

    Args:
        wave: ``(B, 16000)`` float waveform in [-1, 1] (any float dtype, any device).

    Returns:
        ``(B, 1, 101, 40)`` float32 = (batch, channel, time, mel), on the input's device.

    Raises:
        ValueError: If ``wave`` is not ``(B, 16000)``.
    """
    if wave.ndim != 2 or wave.shape[1] != SAMPLE_RATE:
        raise ValueError(f"log_mel expects (B, {SAMPLE_RATE}) waves (1 s at 16 kHz), got {tuple(wave.shape)}")
    mel = _mel_module(str(wave.device))(wave.float())  # (B, 40, 101)
    return torch.log(mel.clamp_min(MEL_FLOOR)).transpose(1, 2).unsqueeze(1)  # (B, 1, 101, 40)


def _normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...], channel_dim: int) -> Tensor:
    shape = [1] * x.ndim
    shape[channel_dim] = 3
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape)
    return (x - m) / s


def frames_to_tensor(frames: Tensor) -> Tensor:
    """Image-student input from uint8 RGB frames.

    Args:
        frames: ``(B, H, W, 3)`` uint8 RGB (numpy arrays are accepted too).

    Returns:
        ``(B, 3, H, W)`` float32, ImageNet-normalised.

    Raises:
        ValueError: If the input is not ``(B, H, W, 3)`` uint8.
    """
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be (B, H, W, 3) uint8, got {tuple(frames.shape)} {frames.dtype}")
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
    return _normalise(x, IMAGE_MEAN, IMAGE_STD, channel_dim=1).contiguous()


def clips_to_tensor(clips: Tensor) -> Tensor:
    """Teacher input from uint8 RGB clips.

    Args:
        clips: ``(B, T, H, W, 3)`` uint8 RGB, T = 16 for a teacher clip (numpy arrays accepted).

    Returns:
        ``(B, 3, T, H, W)`` float32, Kinetics-normalised (what torchvision's ``r2plus1d_18`` expects), laid
        out channels-last (``torch.channels_last_3d``, the input's own order: no copy), as the teacher runs.

    Raises:
        ValueError: If the input is not ``(B, T, H, W, 3)`` uint8.
    """
    clips = torch.as_tensor(clips)
    if clips.ndim != 5 or clips.shape[-1] != 3 or clips.dtype != torch.uint8:
        raise ValueError(f"clips must be (B, T, H, W, 3) uint8, got {tuple(clips.shape)} {clips.dtype}")
    x = clips.permute(0, 4, 1, 2, 3).float().div_(255.0)  # (B, 3, T, H, W), channels-last in memory
    return _normalise(x, KINETICS_MEAN, KINETICS_STD, channel_dim=1).contiguous(
        memory_format=torch.channels_last_3d
    )
