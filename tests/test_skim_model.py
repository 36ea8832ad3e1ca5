"""Equation-level tests of the skimming model (design.md §3); small dims keep each test under a second."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from skim.model import (
    INFERENCE_FIELDS,
    MaskedBatchNorm1d,
    SkimConfig,
    SkimModel,
    available_models,
    create_model,
    interpolate_subsampled,
    model_config,
)

SMALL = {"dim": 16, "hidden": 24, "embed": 12, "num_classes": 4}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one torch thread avoids thread-pool handoffs that dominate on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(cfg: SkimConfig, lengths: list[int], *, seed: int = 0, pad_value: float = 0.0):
    """Random features for ``cfg.batch_keys`` with ragged valid lengths; padding filled with ``pad_value``."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # (B, N)
    feats = {}
    for k in cfg.batch_keys:
        z = torch.randn(len(lengths), n, cfg.dim, generator=g)  # (B, N, D)
        feats[k] = torch.where(mask[..., None], z, pad_value)
    return feats, mask


def warm_up(model: SkimModel, cfg: SkimConfig, steps: int = 3) -> None:
    """A few training-mode passes so the running batch-norm statistics are not the identity."""
    model.train()
    with torch.no_grad():
        for s in range(steps):
            model(*make_batch(cfg, [9, 5, 7], seed=100 + s))
    model.eval()


class PsiRecorder:
    """Records every input of ``model.psi`` (the start input first, then one per selection)."""

    def __init__(self, module: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(
            lambda _m, args, _out: self.inputs.append(args[0].detach())
        )


def test_registry_feeds_models_and_rejects_unknown_names():
    names = available_models()
    assert {"imgaud_skim", "fused_skim", "visual_skim"} <= set(names)
    for name in names:
        model = create_model(name, **SMALL)
        feats, mask = make_batch(model.config, [6, 4])
        assert model(feats, mask).logits.shape == (2, 4)
    with pytest.raises(ValueError, match="available: fused_skim"):
        model_config("nope", **SMALL)


@pytest.mark.parametrize("name", available_models())
def test_every_registered_model_keeps_the_timm_contract(name):
    model = create_model(name, **SMALL).eval()
    feats, mask = make_batch(model.config, [9, 6])
    pooled = model.forward_features(feats, mask)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(pooled), model(feats, mask).logits, rtol=0, atol=0)
    assert model.forward_head(pooled, pre_logits=True) is pooled


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"num_steps": 1}, "num_steps=1"),
        ({"index_features": ("depth",)}, "choose from image"),
        ({"stop_after": 11}, "stop_after=11"),
        ({"exit_threshold": 1.5}, "exit_threshold=1.5"),
        ({"exit_threshold": 0.5, "exit_on": "step_head"}, "step_head_weight > 0"),
        ({"subsample": 0}, "subsample=0"),
        ({"next_input": "argmax"}, "choose from soft, hard"),
        ({"recognition_store": True}, "needs recognition_features"),
        ({"num_classes": 1}, "at least 2 classes"),
    ],
)
def test_config_rejects_bad_values_naming_them(bad, match):
    with pytest.raises(ValueError, match=match):
        SkimConfig(**{**SMALL, **bad})


def test_with_inference_only_changes_inference_fields():
    cfg = SkimConfig(**SMALL)
    assert cfg.with_inference(next_input="hard", stop_after=None).next_input == "hard"
    assert set(INFERENCE_FIELDS) >= {"next_input", "stop_after", "subsample"}
    with pytest.raises(ValueError, match="change the model's parameters"):
        cfg.with_inference(hidden=8)
    assert SkimConfig.from_dict(cfg.to_dict()) == cfg


def test_masked_batch_norm_counts_only_valid_rows():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5)  # (B, N, C)
    mask = torch.rand(3, 7) > 0.4
    x_garbage = torch.where(mask[..., None], x, torch.nan)
    ours, ref = MaskedBatchNorm1d(5, momentum=0.5), nn.BatchNorm1d(5, momentum=0.5)
    y = ours(x_garbage, mask)
    y_ref = ref(x[mask])  # (valid rows, C): the statistics of the valid rows alone
    torch.testing.assert_close(y[mask], y_ref)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


@pytest.mark.parametrize("next_input", ["soft", "hard"])
@pytest.mark.parametrize("training", [True, False])
def test_masking_never_reselects_a_step_or_picks_padding(next_input, training):
    cfg = SkimConfig(**SMALL, next_input=next_input)
    model = SkimModel(cfg).train(training)
    lengths = [30, 12, 25, 4]  # the 4-step video runs out of steps
    out = model(*make_batch(cfg, lengths, seed=1))
    for b, n in enumerate(lengths):
        seen: set[int] = set()
        for s in range(out.chosen.shape[1]):
            picks = {int(j) for j in out.chosen[b, s] if j >= 0}
            assert all(0 <= j < n for j in picks), (b, s, picks)
            assert not picks & seen, f"video {b} re-selected {picks & seen} at selection {s}"
            # weights vanish on padding and on steps chosen before
            w = out.attention[b, s].detach()
            assert float(w[n:].abs().sum()) == 0.0 and float(w[sorted(seen)].abs().sum()) == 0.0
            seen |= picks
        assert cfg.num_steps - 1 <= len(seen) <= 2 * (cfg.num_steps - 1) if n > 20 else len(seen) <= n
    assert len(seen) == 4  # the short video used every step, then stopped
    assert torch.isfinite(out.logits).all()
    assert int(out.steps_used[3]) < cfg.num_steps  # exhausted: stops instead of producing NaN


def test_mean_start_ignores_padding_and_soft_indexing_is_the_weighted_sum():
    cfg = SkimConfig(**SMALL)
    model = SkimModel(cfg)
    warm_up(model, cfg)
    rec = PsiRecorder(model.psi)
    feats, mask = make_batch(cfg, [30, 22], seed=2, pad_value=1e3)
    out = model(feats, mask)
    z_i, z_a = feats["image"], feats["audio"]
    start = rec.inputs[0]  # (B, 2D)
    torch.testing.assert_close(start[1, : cfg.dim], z_i[1, :22].mean(0))
    torch.testing.assert_close(start[1, cfg.dim :], z_a[1, :22].mean(0))
    assert len(rec.inputs) == cfg.num_steps  # start + T-1 selections
    for s in range(cfg.num_steps - 1):
        w = out.attention[:, s]  # (B, N) = beta_I alpha_I + beta_A alpha_A
        torch.testing.assert_close(w.sum(1), torch.ones(2))
        x = rec.inputs[s + 1]
        torch.testing.assert_close(x[:, : cfg.dim], torch.einsum("bn,bnd->bd", w, z_i * mask[..., None]))
        torch.testing.assert_close(x[:, cfg.dim :], torch.einsum("bn,bnd->bd", w, z_a * mask[..., None]))


def test_hard_input_takes_each_modality_at_its_own_query_index():
    cfg = SkimConfig(**SMALL, next_input="hard")
    model = SkimModel(cfg)
    warm_up(model, cfg)
    rec = PsiRecorder(model.psi)
    betas: list[torch.Tensor] = []
    model.modality.register_forward_hook(lambda _m, _a, out: betas.append(out.softmax(1).detach()))
    feats, mask = make_batch(cfg, [30, 25], seed=3)
    out = model(feats, mask)
    z_i, z_a = feats["image"], feats["audio"]
    different = 0
    for s in range(cfg.num_steps - 1):
        for b in range(2):
            j_i, j_a = (int(j) for j in out.chosen[b, s])
            different += j_i != j_a
            beta = betas[s][b]
            x = rec.inputs[s + 1][b]
            torch.testing.assert_close(x[: cfg.dim], beta[0] * z_i[b, j_i] + beta[1] * z_i[b, j_a])
            torch.testing.assert_close(x[cfg.dim :], beta[0] * z_a[b, j_i] + beta[1] * z_a[b, j_a])
    assert different > 0  # the test would not catch an index mix-up if the queries always agreed


@pytest.mark.parametrize("name", ["imgaud_skim", "fused_skim", "visual_skim"])
@pytest.mark.parametrize("next_input", ["soft", "hard"])
def test_ragged_batch_equals_one_by_one_in_eval(name, next_input):
    model = create_model(name, **SMALL, next_input=next_input, step_head_weight=0.5)
    cfg = model.config
    warm_up(model, cfg)
    lengths = [20, 7, 13]
    feats, mask = make_batch(cfg, lengths, seed=4, pad_value=float("nan"))
    out = model(feats, mask)
    for b, n in enumerate(lengths):
        one = model({k: v[b : b + 1, :n] for k, v in feats.items()}, mask[b : b + 1, :n])
        torch.testing.assert_close(one.logits[0], out.logits[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one.chosen[0], out.chosen[b])
        torch.testing.assert_close(one.attention[0], out.attention[b, :, :n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_padding_values_never_change_outputs_or_gradients(training):
    cfg = SkimConfig(**SMALL, step_head_weight=1.0, subsample=2)
    results = []
    for pad in (0.0, float("nan"), 1e6):
        torch.manual_seed(0)
        model = SkimModel(cfg).train(training)
        out = model(*make_batch(cfg, [14, 5, 9], seed=5, pad_value=pad))
        loss = model.loss(out, torch.tensor([0, 1, 3]))
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((out.logits.detach(), loss.detach(), grads))
    for logits, loss, grads in results[1:]:
        assert torch.isfinite(grads).all()
        torch.testing.assert_close(logits, results[0][0])
        torch.testing.assert_close(loss, results[0][1])
        torch.testing.assert_close(grads, results[0][2])


VARIANTS = {
    "paper": {},
    "step_head": {"step_head_weight": 0.3},
    "shared_query": {"shared_query": True},
    "fused_single": {"index_features": ("fused",)},
    "visual_index_av_recognition": {"index_features": ("image",), "recognition_features": ("image", "audio")},
    "second_store": {"recognition_features": ("fused",), "recognition_store": True},
    "subsampled": {"subsample": 3},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_parameter_in_the_loss_receives_a_gradient(variant):
    torch.manual_seed(0)
    cfg = SkimConfig(**SMALL, **VARIANTS[variant])
    model = SkimModel(cfg).train()
    out = model(*make_batch(cfg, [12, 8, 10], seed=6))
    model.loss(out, torch.tensor([0, 2, 1])).backward()
    names = [n for n, _ in model.named_parameters()]
    if cfg.step_head_weight:
        assert any(n.startswith("step_head") for n in names)
    if len(cfg.index_keys) > 1:
        assert any(n.startswith("modality") for n in names)
    if cfg.separate_recognition:
        assert any(n.startswith("psi_start") for n in names)
    dead = [n for n, p in model.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0.0]
    assert not dead, f"parameters without gradient: {dead}"


def test_stop_after_and_early_exit():
    cfg = SkimConfig(**SMALL, step_head_weight=0.5)
    model = SkimModel(cfg)
    warm_up(model, cfg)
    feats, mask = make_batch(cfg, [20, 16], seed=7)
    full = model(feats, mask)
    assert full.steps_used.tolist() == [10, 10]
    three = SkimModel(cfg.with_inference(stop_after=3))
    three.load_state_dict(model.state_dict())
    out3 = three.eval()(feats, mask)
    assert out3.steps_used.tolist() == [3, 3] and out3.chosen.shape[1] == 2
    torch.testing.assert_close(out3.chosen, full.chosen[:, :2])
    one = SkimModel(cfg.with_inference(stop_after=1))
    one.load_state_dict(model.state_dict())
    out1 = one.eval()(feats, mask)
    for exit_on in ("running", "step_head"):
        # any max-probability clears a threshold of 1/C: every video exits after its first step
        eager = SkimModel(cfg.with_inference(exit_threshold=1 / cfg.num_classes, exit_on=exit_on))
        eager.load_state_dict(model.state_dict())
        out = eager.eval()(feats, mask)
        assert out.steps_used.tolist() == [1, 1]
        assert (out.chosen == -1).all()
        torch.testing.assert_close(out.logits, out1.logits)
    never = SkimModel(cfg.with_inference(exit_threshold=1.0))
    never.load_state_dict(model.state_dict())
    torch.testing.assert_close(never.eval()(feats, mask).logits, full.logits)


def test_interpolation_of_subsampled_features_is_linear_and_holds_the_tail():
    n, d = 11, 3
    ramp = torch.arange(n, dtype=torch.float32)[None, :, None].expand(2, n, d).clone()  # (2, N, D), z[j] = j
    ramp[:, :, 1] = torch.randn(n)  # a column that is not linear
    out = interpolate_subsampled(ramp, torch.tensor([11, 7]), 3)
    torch.testing.assert_close(out[0, :10, 0], torch.arange(10, dtype=torch.float32))  # kept 0,3,6,9
    assert float(out[0, 10, 0]) == 9.0  # past the last kept row: held
    torch.testing.assert_close(out[1, :7, 0], torch.tensor([0, 1, 2, 3, 4, 5, 6.0]))
    torch.testing.assert_close(out[:, ::3, 1], ramp[:, ::3, 1])  # kept rows are exact
    assert not torch.equal(out[0, 1, 1], ramp[0, 1, 1])


def test_subsampled_model_only_sees_kept_rows():
    cfg = SkimConfig(**SMALL, index_features=("fused",), subsample=4)
    model = SkimModel(cfg)
    warm_up(model, cfg)
    feats, mask = make_batch(cfg, [17], seed=8)
    changed = {k: v.clone() for k, v in feats.items()}
    changed["fused"][:, 1:4] += 5.0  # rows between kept rows 0 and 4
    torch.testing.assert_close(model(feats, mask).logits, model(changed, mask).logits)
    full = SkimModel(cfg.with_inference(subsample=1))
    full.load_state_dict(model.state_dict())
    assert not torch.allclose(full.eval()(feats, mask).logits, full(changed, mask).logits)


def test_gflops_grow_with_video_length_and_steps():
    model = create_model("imgaud_skim", num_classes=10)
    small, long_, more = model.gflops(100, 10), model.gflops(1000, 10), model.gflops(100, 20)
    assert 0 < small < long_ and small < more
    keys = 2 * 2 * 1000 * 512 * 512 / 1e9  # two 512x512 key projections per step
    assert 1.0 < long_ / keys < 1.5  # the keys dominate


def test_deferred_key_gradient_equals_plain_autograd():
    from skim.model import _KeyHub, _Scores

    g = torch.Generator().manual_seed(9)
    base = torch.randn(3, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    q0 = torch.randn(3, 5, generator=g, dtype=torch.float64)

    def grads(deferred: bool) -> torch.Tensor:
        keys = torch.relu(2 * base)
        buf: list = []
        if deferred:
            keys = _KeyHub.apply(keys, buf)
        q, total = q0, 0.0
        for _ in range(4):  # each query depends on the previous scores, as in the model
            s = _Scores.apply(keys, q, buf) if deferred else torch.einsum("bnd,bd->bn", keys, q)
            a = s.softmax(1)
            q = torch.tanh(torch.einsum("bn,bnd->bd", a, base) + q)
            total = total + (a * torch.arange(7.0)).sum() + q.sum()
        return torch.autograd.grad(total, base)[0]

    torch.testing.assert_close(grads(True), grads(False))


def test_checkpoint_uses_the_one_envelope_and_verifies_sha256_on_every_load(tmp_path):
    from indexing.errors import CheckpointError
    from skim.checkpoint import load_checkpoint, save_checkpoint

    model = create_model("imgaud_skim", **SMALL)
    path = save_checkpoint(
        tmp_path / "skim.pt", model_name="imgaud_skim", model=model, epoch=2, train_config={"lr": 0.1},
        training={"history": [{"epoch": 1}, {"epoch": 2}]}, extra={"labels": list("abcd")},
    )  # fmt: skip
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "l2l-checkpoint" and raw["kind"] == "skim" and len(raw["sha256"]) == 64
    loaded = load_checkpoint(path)
    assert loaded.name == "imgaud_skim" and loaded.labels == list("abcd") and loaded.config == model.config
    assert loaded.meta["epoch"] == 2 and loaded.meta["train_config"] == {"lr": 0.1}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v)

    raw["state_dict"]["skim.classifier.bias"] += 1  # one flipped weight
    torch.save(raw, tmp_path / "corrupt.pt")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "corrupt.pt")
    legacy = {"format": "l2l-skim", "version": 1, "model": "imgaud_skim", "state_dict": model.state_dict()}
    torch.save(legacy, tmp_path / "legacy.pt")
    with pytest.raises(CheckpointError, match="older l2l.*no weights checksum.*`l2l train`"):
        load_checkpoint(tmp_path / "legacy.pt")
    with pytest.raises(CheckpointError, match="found kind 'skim'; make one with `l2l distill`"):
        from indexing.models import load_students

        load_students(path)
