"""ImgAud2Vid models, front end, checkpoints and FLOPs: shapes from the registry, errors, round trips."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from indexing import checkpoint as ckpt_io
from indexing.errors import CheckpointError
from indexing.frontend import IMAGE_MEAN, IMAGE_STD, KINETICS_MEAN, clips_to_tensor, frames_to_tensor, log_mel
from indexing.models import (
    PRESETS,
    ROLES,
    available_models,
    available_presets,
    build_students,
    build_teacher,
    create_model,
    load_students,
    load_teacher,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core box spinning threads cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


INPUTS = {  # role -> batch-1 input(s)
    "image": lambda: (torch.randn(1, 3, 112, 112),),
    "audio": lambda: (torch.randn(1, 1, 101, 40),),
    "fusion": lambda: (torch.randn(1, 512), torch.randn(1, 512)),
    "classifier": lambda: (torch.randn(1, 512),),
    "teacher": lambda: (torch.randn(1, 3, 16, 112, 112),),
}


def _role(name: str) -> str:
    return name.split("_", 1)[0]


def test_registry_covers_every_role_and_preset():
    assert set(available_presets()) == {"paper", "tiny"}
    for role in ROLES:
        assert available_models(role), role
    for preset, names in PRESETS.items():
        for role, name in names.items():
            assert name in available_models(role), (preset, role)
    with pytest.raises(ValueError, match="available: .*image_resnet18"):
        create_model("resnet9000")
    with pytest.raises(ValueError, match="available"):
        available_models("video")


@pytest.mark.parametrize("name", available_models())
def test_model_output_shape(name):
    torch.manual_seed(0)
    device = "meta" if name == "teacher_r2plus1d_18" else "cpu"  # 81 GFLOPs per clip: shapes only
    with torch.device(device), torch.no_grad():
        model = create_model(name).eval()
        out = model(*INPUTS[_role(name)]())
    if _role(name) == "classifier":
        assert out.shape == (1, model.num_classes)
    else:
        assert out.shape == (1, 512)
        assert model.num_features == 512
    assert device == "meta" or torch.isfinite(out).all()
    assert model.model_name == name


@pytest.mark.parametrize("name", available_models())
def test_every_registered_model_keeps_the_timm_contract(name):
    """forward == forward_head(forward_features); pre-logits output is num_features wide."""
    torch.manual_seed(0)
    device = "meta" if name == "teacher_r2plus1d_18" else "cpu"  # 81 GFLOPs per clip: shapes only
    with torch.device(device), torch.no_grad():
        model = create_model(name).eval()
        inputs = INPUTS[_role(name)]()
        feats = model.forward_features(*inputs)
        head = model.forward_head(feats)
        pre = model.forward_head(feats, pre_logits=True)
        out = model(*inputs)
    assert isinstance(model.num_features, int) and pre.shape == (1, model.num_features)
    assert head.shape == out.shape
    if device == "cpu":
        torch.testing.assert_close(head, out, rtol=0, atol=0)
    if _role(name) == "classifier":
        assert out.shape == (1, model.num_classes) and pre.shape == (1, model.fc.in_features)


def test_students_report_their_width_for_extraction():
    image = create_model("image_resnet18_tiny", num_features=96)
    audio = create_model("audio_resnet18_tiny", num_features=96)
    fusion = create_model("fusion_mlp_tiny", in_features=192, num_features=96)
    from indexing.models import Students

    students = Students(image, audio, fusion)
    assert students.num_features == 96
    rng = np.random.default_rng(0)
    feats = students.embed(
        rng.integers(0, 255, (2, 112, 112, 3), dtype=np.uint8), np.zeros((2, 16000), np.float32)
    )
    assert all(v.shape == (2, 96) for v in feats.values())


def test_paper_image_trunk_is_torchvision_resnet18():
    from torchvision.models import resnet18

    torch.manual_seed(1)
    tv = resnet18(weights=None).eval()
    image = create_model("image_resnet18").eval()
    state = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    ckpt_io.load_state_checked(image.trunk, state, where="torchvision resnet18")
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = torch.flatten(
            tv.avgpool(tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))),
            1,
        )
        torch.testing.assert_close(image(x), expected)


def test_audio_student_collapses_three_frequency_bins():
    audio = create_model("audio_resnet18_tiny").eval()
    assert audio.freq_bins == 3 and audio.trunk.conv1.stride == (1, 1) and audio.trunk.conv1.in_channels == 1
    with torch.no_grad():
        feats = audio.forward_features(torch.randn(2, 1, 101, 40))
    assert feats.shape == (2, 128, 7)  # (B, C, T'): 101 time frames -> 7


def test_log_mel_matches_direct_stft_melbank():
    import torchaudio.functional as AF

    gen = torch.Generator().manual_seed(0)
    t = torch.arange(16000) / 16000
    wave = torch.stack([0.5 * torch.sin(2 * torch.pi * 440 * t), 0.1 * torch.randn(16000, generator=gen)])
    mel = log_mel(wave)
    assert mel.shape == (2, 1, 101, 40) and mel.dtype == torch.float32
    spec = (
        torch.stft(
            wave, 400, 160, 400, torch.hann_window(400), center=True, pad_mode="reflect", return_complex=True
        ).abs()
        ** 2
    )  # (2, 201, 101)
    fb = AF.melscale_fbanks(201, 0.0, 8000.0, 40, 16000, norm=None, mel_scale="htk")  # (201, 40)
    direct = torch.log((spec.transpose(1, 2) @ fb).clamp_min(1e-6)).unsqueeze(1)  # (2, 1, 101, 40)
    torch.testing.assert_close(mel, direct, rtol=1e-4, atol=1e-3)
    # 440 Hz lands in a low band: that band outweighs the top band by orders of magnitude.
    assert mel[0, 0, 50].argmax() < 15
    silent = log_mel(torch.zeros(1, 16000))
    assert torch.allclose(silent, torch.full_like(silent, float(np.log(1e-6))))
    with pytest.raises(ValueError, match="16000"):
        log_mel(torch.zeros(1, 8000))


def test_frame_and_clip_normalisation():
    frames = torch.full((2, 8, 6, 3), 255, dtype=torch.uint8)
    x = frames_to_tensor(frames)
    assert x.shape == (2, 3, 8, 6)
    torch.testing.assert_close(x[0, :, 0, 0], (1 - torch.tensor(IMAGE_MEAN)) / torch.tensor(IMAGE_STD))
    clips = torch.zeros(1, 16, 8, 6, 3, dtype=torch.uint8)
    c = clips_to_tensor(clips)
    assert c.shape == (1, 3, 16, 8, 6)
    assert c[0, 0, 0, 0, 0] < 0 and abs(float(c[0, 1].mean()) + KINETICS_MEAN[1] / 0.22145) < 1e-4
    with pytest.raises(ValueError, match="uint8"):
        frames_to_tensor(frames.float())


def test_students_forward_and_embed_agree():
    students = build_students("tiny", seed=3).eval()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (3, 112, 112, 3), dtype=np.uint8)
    wave = rng.uniform(-0.5, 0.5, (3, 16000)).astype(np.float32)
    feats = students.embed(frames, wave)
    assert set(feats) == {"image", "audio", "fused"}
    assert all(v.shape == (3, 512) and v.dtype == np.float32 for v in feats.values())
    with torch.no_grad():
        out = students(frames_to_tensor(torch.from_numpy(frames)), log_mel(torch.from_numpy(wave)))
    np.testing.assert_allclose(feats["fused"], out["z_ia"].numpy(), rtol=1e-5, atol=1e-5)
    assert out["logits"] is None
    # Same seed, same weights; another seed differs.
    again = build_students("tiny", seed=3).embed(frames, wave)
    np.testing.assert_array_equal(feats["fused"], again["fused"])
    assert not np.allclose(build_students("tiny", seed=4).embed(frames, wave)["fused"], feats["fused"])


def test_random_students_are_flagged(caplog):
    with caplog.at_level(logging.INFO):  # info: every worker loads them; `l2l extract` warns once itself
        students, meta = load_students("random:5:tiny")
    assert meta["random"] is True and meta["preset"] == "tiny" and meta["models"]["image"]["name"]
    assert "RANDOM" in caplog.text
    assert meta["sha256"] == ckpt_io.weights_sha256(students.state_dict())
    with pytest.raises(ValueError, match="random:SEED"):
        load_students("random:x")


def _save_students(path, students, **kw):
    return ckpt_io.save_checkpoint(
        path, kind="students", models=students.specs(), state_dict=students.state_dict(), **kw
    )


def test_checkpoint_round_trip(tmp_path):
    students = build_students("tiny", seed=1, num_classes=4)
    path = _save_students(
        tmp_path / "s.pt", students, epoch=3, config={"lr": 0.1}, extra={"classes": list("abcd")}
    )
    loaded, meta = load_students(path)
    assert meta["random"] is False and meta["epoch"] == 3 and meta["classes"] == list("abcd")
    assert meta["sha256"] == ckpt_io.weights_sha256(students.state_dict())
    assert loaded.classifier is not None and loaded.classifier.num_classes == 4
    for k, v in students.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    assert len(ckpt_io.sha256_file(path)) == 64


def test_wrong_checkpoints_are_refused(tmp_path):
    teacher = build_teacher("tiny")
    torch.save(teacher.net.state_dict(), tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match="expected an l2l 'students' checkpoint.*--teacher-weights"):
        load_students(tmp_path / "teacher.pt")

    students = build_students("tiny")
    skim = ckpt_io.save_checkpoint(tmp_path / "skim.pt", kind="skim", models={}, state_dict={})
    with pytest.raises(ValueError, match="expected an l2l 'students' checkpoint, found kind 'skim'"):
        load_students(skim)

    good = _save_students(tmp_path / "students.pt", students)
    with pytest.raises(
        ValueError, match="expected a torchvision r2plus1d_18 state dict.*'students' checkpoint"
    ):
        load_teacher(good)

    ckpt = torch.load(good, weights_only=True)
    ckpt["models"]["fusion"]["args"] = {"hidden": 64}  # the weights were made with hidden=128
    torch.save(ckpt, tmp_path / "shapes.pt")
    with pytest.raises(
        ValueError, match=r"fusion: fusion_mlp_tiny.*shape mismatches.*fc1.weight: expected \(64"
    ):
        load_students(tmp_path / "shapes.pt")

    ckpt = torch.load(good, weights_only=True)
    ckpt["state_dict"]["fusion.fc1.bias"] += 1
    torch.save(ckpt, tmp_path / "corrupt.pt")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_students(tmp_path / "corrupt.pt")

    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_students(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_students(tmp_path / "missing.pt")


class Payload:  # any non-allow-listed class: torch.load(weights_only=True) must refuse to build it
    def __init__(self):
        self.x = 1


def test_pickled_objects_are_refused_without_advice_to_unpickle(tmp_path):
    from skim.checkpoint import load_checkpoint as load_skim

    torch.save({"state_dict": {}, "payload": Payload()}, tmp_path / "evil.pt")
    for load in (load_students, load_teacher, load_skim):
        with pytest.raises(CheckpointError, match="pickled Python objects") as err:
            load(tmp_path / "evil.pt")
        message = str(err.value)
        assert "was not loaded" in message and "source you trust" in message, message
        assert "weights_only=False" not in message, message


def test_teacher_from_torchvision_state_dict_is_frozen(tmp_path):
    from torchvision.models.video import r2plus1d_18

    torch.manual_seed(2)
    tv = r2plus1d_18(weights=None, num_classes=7)
    torch.save({"state_dict": tv.state_dict()}, tmp_path / "k400.pt")
    teacher, meta = load_teacher(tmp_path / "k400.pt")
    assert teacher.num_classes == 7 and meta["random"] is False and meta["name"] == "teacher_r2plus1d_18"
    torch.testing.assert_close(teacher.net.fc.weight, tv.fc.weight)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(not m.training for m in teacher.modules())
    with pytest.raises(ValueError, match="exactly one"):
        load_teacher(tmp_path / "k400.pt", preset="tiny")


def test_tiny_teacher_is_seeded():
    a, meta_a = load_teacher(preset="tiny")
    b, meta_b = load_teacher(preset="tiny")
    assert meta_a["sha256"] == meta_b["sha256"] and meta_a["random"] is True
    assert meta_a["sha256"] != load_teacher(preset="tiny", seed=1)[1]["sha256"]
    with torch.no_grad():
        out = a(torch.randn(2, 3, 16, 112, 112))
    assert out.shape == (2, 512) and a.logits(out).shape == (2, a.num_classes)


def test_measured_gflops_orders():
    from indexing.flops import measured_gflops

    paper = measured_gflops("paper")
    assert 0.8 < paper["image"] < 1.2 and 1.0 < paper["audio"] < 1.5 and paper["fusion"] < 0.01
    assert 75 < paper["teacher_clip"] < 90  # 2 x 40.5 G multiply-adds
    assert paper["students"] == pytest.approx(paper["image"] + paper["audio"] + paper["fusion"])
    assert paper["teacher_clip"] / paper["students"] > 30
    tiny = measured_gflops("tiny")
    assert tiny["students"] < paper["students"] / 10
