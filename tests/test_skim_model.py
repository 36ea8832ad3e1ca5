"""Equation-level tests of the skimming model (design.md §3); small dims keep each test under a second."""

from __future__ import annotations

from dataclasses import replace

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


@pytest.mark.parametrize("mask", ["per_modality", "shared"])
@pytest.mark.parametrize("next_input", ["soft", "hard"])
@pytest.mark.parametrize("training", [True, False])
def test_masking_never_reselects_a_step_or_picks_padding(mask, next_input, training):
    cfg = SkimConfig(**SMALL, next_input=next_input, mask=mask)
    model = SkimModel(cfg).train(training)
    lengths = [30, 12, 25, 4]  # the 4-step video runs out of steps
    out = model(*make_batch(cfg, lengths, seed=1))
    for b, n in enumerate(lengths):
        seen: list[set[int]] = [set(), set()]  # per modality
        for s in range(out.chosen.shape[1]):
            picks = [int(j) for j in out.chosen[b, s]]
            if picks[0] < 0:
                assert all(j < 0 for j in out.chosen[b, s:].flatten()), "a stopped video never restarts"
                break
            assert all(0 <= j < n for j in picks), (b, s, picks)
            w = out.attention[b, s].detach()
            assert float(w[n:].abs().sum()) == 0.0  # padding never weighted
            if mask == "shared":  # no step is chosen twice by any query, and chosen steps get no weight
                both = seen[0] | seen[1]
                assert not set(picks) & both, f"video {b} re-selected {set(picks) & both} at {s}"
                assert float(w[sorted(both)].abs().sum()) == 0.0
            else:  # each query never re-selects its own picks; the other's picks stay open to it
                for m in (0, 1):
                    assert picks[m] not in seen[m], f"video {b} modality {m} re-selected {picks[m]} at {s}"
            for m in (0, 1):
                seen[m].add(picks[m])
        if n > 20:
            assert all(len(x) == cfg.num_steps - 1 for x in seen)
    assert torch.isfinite(out.logits).all()
    short = [int(j) for j in out.chosen[3].flatten() if j >= 0]
    if mask == "per_modality":  # each modality takes all 4 steps once, then the video stops
        assert sorted(short[0::2]) == sorted(short[1::2]) == [0, 1, 2, 3]
        assert int(out.steps_used[3]) == 5
    else:  # picks leave both modalities: at most 4 distinct steps, fewer selections
        assert set(short) == {0, 1, 2, 3} and int(out.steps_used[3]) <= 4
    assert int(out.steps_used[3]) < cfg.num_steps  # exhausted: stops instead of producing NaN


@pytest.mark.parametrize("training", [True, False])
def test_videos_shorter_than_t_stop_early_even_when_the_whole_batch_is_short(training):
    """The reference pads by repeating the last row and crashes on an all-short batch; we stop early."""
    cfg = SkimConfig(**SMALL, step_head_weight=0.5)
    model = SkimModel(cfg).train(training)
    feats, mask = make_batch(cfg, [4, 2, 1], seed=11, pad_value=float("nan"))
    out = model(feats, mask)
    assert out.steps_used.tolist() == [5, 3, 2]  # the mean start + one selection per step
    for b, n in enumerate([4, 2, 1]):
        picks = out.chosen[b, :n]
        assert (picks >= 0).all() and (out.chosen[b, n:] == -1).all()
        for m in range(2):
            assert sorted(picks[:, m].tolist()) == list(range(n))
    loss = model.loss(out, torch.tensor([0, 1, 2]))
    assert torch.isfinite(loss)
    if training:
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _bn_eval(x: torch.Tensor, bn: MaskedBatchNorm1d) -> torch.Tensor:
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def _weight_normed(module: nn.Module, name: str) -> torch.Tensor:
    g, v = (
        getattr(module.parametrizations, name).original0,
        getattr(module.parametrizations, name).original1,
    )
    return g * v / v.norm(dim=1, keepdim=True)  # weight_norm over dim 0: one norm per output row


@pytest.mark.parametrize("next_input", ["soft", "hard"])
def test_equations_of_design_section_3_by_direct_computation(next_input):
    """Keys, mean start, LSTM, queries, per-modality masks, attention, modality attention, next input and
    the classifier on the mean of Psi outputs, each written out with plain tensor ops."""
    cfg = SkimConfig(**SMALL, next_input=next_input)
    model = SkimModel(cfg)
    warm_up(model, cfg)  # eval mode with running statistics that are not the identity
    lengths = [14, 9]
    feats, mask = make_batch(cfg, lengths, seed=12, pad_value=float("nan"))
    with torch.no_grad():
        out = model(feats, mask)
        w_ih, w_hh = _weight_normed(model.lstm, "weight_ih"), _weight_normed(model.lstm, "weight_hh")
        d, t_steps = cfg.dim, cfg.num_steps
        per_modality_differs = False
        for b, n in enumerate(lengths):
            z = [feats["image"][b, :n], feats["audio"][b, :n]]  # (n, D) each, valid rows only
            keys = [  # k_M[j] = ReLU(BN(W_M z_M[j]))
                torch.relu(
                    _bn_eval(z[m] @ model.key_proj[m].weight.T + model.key_proj[m].bias, model.key_bn[m])
                )
                for m in range(2)
            ]
            x = [z[0].mean(0), z[1].mean(0)]  # start: the mean of the valid rows
            h = torch.zeros(cfg.hidden)
            c = torch.zeros(cfg.hidden)
            open_ = [
                torch.ones(n, dtype=torch.bool),
                torch.ones(n, dtype=torch.bool),
            ]  # one mask per modality
            us = []
            for t in range(t_steps):
                u = model.psi(torch.cat(x))  # u_t = Psi(x_I, x_A)
                us.append(u)
                if t == t_steps - 1:
                    break
                gates = w_ih @ u + model.lstm.bias_ih + w_hh @ h + model.lstm.bias_hh
                i, f, g, o = gates.chunk(4)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                alphas = []
                for m in range(2):
                    qm = model.query[m]
                    q = qm.fc2(torch.relu(_bn_eval(qm.fc1(h), qm.bn)))  # q_M = MLP_M(h)
                    s = keys[m] @ q / d**0.5  # s_M[j] = q_M . k_M[j] / sqrt(D)
                    alphas.append(torch.where(open_[m], s, float("-inf")).softmax(0))
                beta = (model.modality.weight @ h + model.modality.bias).softmax(0)
                picks = [int(a.argmax()) for a in alphas]
                torch.testing.assert_close(out.chosen[b, t].tolist(), picks)
                soft = beta[0] * alphas[0] + beta[1] * alphas[1]
                torch.testing.assert_close(out.attention[b, t, :n], soft, atol=1e-6, rtol=1e-5)
                for m in range(2):
                    assert float(alphas[m][~open_[m]].sum()) == 0.0  # own earlier picks are masked
                    per_modality_differs |= bool((alphas[1 - m][~open_[m]] > 0).any())
                if next_input == "soft":  # x_I = b0 sum a_I z_I + b1 sum a_A z_I, x_A likewise
                    x = [beta[0] * alphas[0] @ z[k] + beta[1] * alphas[1] @ z[k] for k in range(2)]
                else:  # hard: each modality's feature at each query's own argmax
                    x = [beta[0] * z[k][picks[0]] + beta[1] * z[k][picks[1]] for k in range(2)]
                for m in range(2):
                    open_[m][picks[m]] = False
            logits = model.classifier(torch.stack(us).mean(0))  # classifier on the mean of u_0..u_{T-1}
            torch.testing.assert_close(out.logits[b], logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.pooled[b], torch.stack(us).mean(0), atol=1e-5, rtol=1e-5)
    assert per_modality_differs  # a step one query took still drew weight from the other query


@pytest.mark.parametrize("query_bn, updates", [("every_step", 10), ("skip_last", 9)])
@pytest.mark.parametrize("step_head_weight", [0.0, 0.5])
def test_query_batch_norm_sees_every_query(query_bn, updates, step_head_weight):
    cfg = SkimConfig(**SMALL, query_bn=query_bn, step_head_weight=step_head_weight)
    model = SkimModel(cfg).train()
    feats, mask = make_batch(cfg, [20, 16, 18], seed=13)
    before = [q.bn.running_mean.clone() for q in model.query]
    out = model(feats, mask)
    assert [int(q.bn.num_batches_tracked) for q in model.query] == [updates, updates]
    assert out.chosen.shape[1] == cfg.num_steps - 1  # the last query chooses nothing
    # The extra update changes only statistics: same logits and chosen steps as skipping it.
    other = SkimModel(replace(cfg, query_bn="skip_last" if query_bn == "every_step" else "every_step"))
    other.load_state_dict(model.state_dict())
    for q, b in zip(other.query, before, strict=True):
        q.bn.running_mean.copy_(b)
    again = other.train()(feats, mask)
    torch.testing.assert_close(again.logits, out.logits)
    torch.testing.assert_close(again.chosen, out.chosen)


def test_reference_init_and_torch_init():
    torch.manual_seed(0)
    ref = SkimModel(SkimConfig(**{**SMALL, "hidden": 256, "dim": 128}))
    torch.manual_seed(0)
    old = SkimModel(SkimConfig(**{**SMALL, "hidden": 256, "dim": 128}, weight_init="torch"))
    for name, m in ref.named_modules():
        if isinstance(m, nn.Linear) and m.weight.numel() > 4000:  # enough samples to estimate the std
            w = m.weight.detach()
            if name.startswith(("psi", "classifier")):  # from the students, or PyTorch's default
                assert abs(float(w.std()) - 0.02) > 0.005, name
            else:
                assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002, name
    assert float(ref.lstm.bias_ih.detach().abs().sum()) == 0.0 == float(ref.lstm.bias_hh.detach().abs().sum())
    assert float(old.lstm.bias_ih.detach().abs().sum()) > 0
    assert (
        abs(float(old.query[0].fc1.weight.detach().std()) - 0.02) > 0.005
    )  # PyTorch's default is U(+-1/sqrt(fan_in))
    from skim.model import reference_init

    bn = nn.Sequential(nn.BatchNorm2d(4096))
    reference_init(bn)
    w = bn[0].weight.detach()
    assert abs(float(w.mean()) - 1) < 0.003 and abs(float(w.std()) - 0.02) < 0.003


def test_checkpoints_without_the_new_fields_keep_their_old_behaviour():
    legacy = {
        k: v for k, v in SkimConfig(**SMALL).to_dict().items() if k not in ("mask", "query_bn", "weight_init")
    }
    cfg = SkimConfig.from_dict(legacy)
    assert (cfg.mask, cfg.query_bn, cfg.weight_init) == ("shared", "skip_last", "torch")
    assert SkimConfig.from_dict(SkimConfig(**SMALL).to_dict()).mask == "per_modality"


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
    "shared_mask": {"mask": "shared"},
    "skip_last_query_bn": {"query_bn": "skip_last"},
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


# ---- Psi and the classifier from the students checkpoint ---------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from skim.synthetic import PlantedSpec, write_planted_store

    spec = PlantedSpec(videos=20, classes=4, min_steps=16, max_steps=24, dim=SMALL["dim"], seed=3)
    return write_planted_store(tmp_path_factory.mktemp("planted") / "store", spec)


def _save_students(path, classes):
    from indexing import checkpoint as ckpt_io
    from indexing.models import Students
    from indexing.models import create_model as create_student

    d = SMALL["dim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        students = Students(
            create_student("image_resnet18_tiny", num_features=d),
            create_student("audio_resnet18_tiny", num_features=d),
            create_student("fusion_mlp_tiny", in_features=2 * d, hidden=20, num_features=d),
            create_student("classifier_linear", in_features=d, num_classes=len(classes)),
        )
    ckpt_io.save_checkpoint(
        path, kind="students", models=students.specs(), state_dict=students.state_dict(),
        extra={"classes": list(classes)},
    )  # fmt: skip
    return students


FAST = {"epochs": 1, "batch_size": 4, "crop_min": 8, "crop_max": 16, "milestones": ()}


def test_psi_and_classifier_start_from_the_students(planted, tmp_path):
    from indexing import checkpoint as ckpt_io
    from skim.checkpoint import load_checkpoint
    from skim.train import TrainConfig, train

    classes = ["class3", "class1", "other", "class0", "class2"]  # another order and one more class
    students = _save_students(tmp_path / "students.pt", classes)
    out = tmp_path / "skim.pt"
    summary = train(
        planted["store"], out, labels=planted["labels"], model_options={"hidden": 24},
        config=TrainConfig(**FAST, lr=0.5), students=tmp_path / "students.pt", progress=False,
        log=lambda _: None,
    )  # fmt: skip
    ckpt = load_checkpoint(out)
    assert ckpt.meta["init"]["from"] == "students" and ckpt.meta["init"]["path"] == str(
        tmp_path / "students.pt"
    )
    assert ckpt.meta["init"]["sha256"] == ckpt_io.weights_sha256(students.state_dict())
    assert (ckpt.config.embed, ckpt.config.psi_hidden) == (SMALL["dim"], 20)
    # Psi is frozen: exactly the students' fusion after training.
    torch.testing.assert_close(ckpt.model.psi[0].weight, students.fusion.fc1.weight, rtol=0, atol=0)
    torch.testing.assert_close(ckpt.model.psi[2].bias, students.fusion.fc2.bias, rtol=0, atol=0)
    # The classifier started from the students' rows for class0..class3 and moved.
    rows = [classes.index(n) for n in summary["labels"]]
    start = students.classifier.fc.weight.detach()[rows]
    assert not torch.equal(ckpt.model.classifier.weight, start)
    assert float((ckpt.model.classifier.weight.detach() - start).abs().max()) < 0.5


def test_psi_frozen_and_classifier_at_a_tenth_of_the_rate(planted, tmp_path):
    from indexing.stores import open_store
    from indexing.training import Schedule, StepResult, fit, sgd
    from skim.train import TrainConfig, param_groups, students_start

    names = [f"class{c}" for c in range(4)]
    _save_students(tmp_path / "students.pt", names)
    store = open_store(planted["store"])
    probe = create_model("imgaud_skim", **{**SMALL, "embed": SMALL["dim"]}).config
    start = students_start(store, probe, names, tmp_path / "students.pt")
    model = SkimModel(replace(probe, **start.options))
    start.apply(model)
    config = TrainConfig(lr=0.5, momentum=0.0, nesterov=False, weight_decay=0.0)
    opt = sgd(param_groups(model, config), momentum=0.0, nesterov=False, weight_decay=0.0)
    feats, mask = make_batch(model.config, [12, 9, 16], seed=14)
    labels = torch.tensor([0, 3, 1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def step(_batch):
        # The gradients from a separate, identical forward (the key gradient buffers are used up by one
        # backward); training-mode outputs do not depend on the running statistics it also updates.
        probe = model.loss(model.train()(feats, mask), labels)
        found = torch.autograd.grad(probe, [p for _, p in trainable])
        grads.update(zip([n for n, _ in trainable], found, strict=True))
        loss = model.loss(model(feats, mask), labels)
        return StepResult(loss, 3)

    fit(stage="t", epochs=1, optimizer=opt, schedule=Schedule(lr=0.5), batches=lambda _e: [None], step=step,
        save=lambda _e, _s: None, progress=False, note=lambda _l: None)  # fmt: skip
    for name, p in model.named_parameters():
        moved = p.detach() - before[name]
        if name.startswith("psi."):
            assert not p.requires_grad and name not in grads and float(moved.abs().sum()) == 0.0, name
        elif name.startswith("classifier."):
            torch.testing.assert_close(moved, -0.05 * grads[name])  # 0.1 x lr
        else:
            torch.testing.assert_close(moved, -0.5 * grads[name], atol=1e-6, rtol=1e-4)
    dead = [n for n, g in grads.items() if float(g.abs().sum()) == 0.0]
    assert not dead, f"trainable parameters without gradient next to a frozen Psi: {dead}"


def test_students_start_refuses_what_it_cannot_use(planted, tmp_path):
    import zarr

    from indexing.errors import CheckpointError, ConfigError
    from indexing.stores import open_store
    from skim.train import students_start

    names = [f"class{c}" for c in range(4)]
    store = open_store(planted["store"])
    cfg = create_model("imgaud_skim", **SMALL).config
    with pytest.raises(CheckpointError, match="records none.*--students CHECKPOINT.*--init scratch"):
        students_start(store, cfg, names)
    with pytest.raises(CheckpointError, match="not available.*does not exist.*--init scratch"):
        students_start(store, cfg, names, tmp_path / "moved.pt")
    _save_students(tmp_path / "three.pt", names[:3])
    with pytest.raises(CheckpointError, match=r"missing \['class3'\].*l2l finetune.*--init scratch"):
        students_start(store, cfg, names, tmp_path / "three.pt")
    with pytest.raises(ConfigError, match=r"recognises with \['fused'\].*--init scratch"):
        students_start(store, create_model("fused_skim", **SMALL).config, names, tmp_path / "three.pt")
    # A store that records the students that made it: another checkpoint is refused by its sha256.
    _save_students(tmp_path / "good.pt", names)
    group = zarr.open_group(str(planted["store"]), mode="r+")
    attrs = dict(group.attrs)
    group.attrs["models"] = {"students": {"spec": str(tmp_path / "good.pt"), "sha256": "0" * 64}}
    try:
        with pytest.raises(CheckpointError, match="was made with 000000000000"):
            students_start(open_store(planted["store"]), cfg, names)
    finally:
        group.attrs.put(attrs)


def test_eval_reuses_lstm_weights_only_while_the_parameters_are_unchanged():
    """Without autograd the weight-normed LSTM weights are computed once and reused across forwards: equal to
    the per-forward computation, and recomputed after an optimiser step or a load_state_dict."""
    cfg = SkimConfig(**SMALL)
    model = SkimModel(cfg)
    warm_up(model, cfg)
    feats, mask = make_batch(cfg, [9, 4, 7], seed=5)

    def fresh() -> torch.Tensor:  # the per-forward path (autograd on: no reuse)
        with torch.enable_grad():
            return model(feats, mask).logits.detach()

    with torch.no_grad():
        first = model(feats, mask).logits
        assert "_eval_lstm_weights" in model.__dict__
        torch.testing.assert_close(first, fresh(), rtol=0, atol=0)
        torch.testing.assert_close(model(feats, mask).logits, first, rtol=0, atol=0)
    opt = torch.optim.SGD(model.lstm.parameters(), lr=0.5)
    model.train()
    model(feats, mask).logits.sum().backward()
    opt.step()  # in place: bumps the parameters' versions
    model.eval()
    with torch.no_grad():
        after = model(feats, mask).logits
    assert not torch.equal(after, first)
    torch.testing.assert_close(after, fresh(), rtol=0, atol=0)
    other = SkimModel(cfg)
    model.load_state_dict(other.state_dict())  # copy_ into the same storage
    with torch.no_grad():
        torch.testing.assert_close(model(feats, mask).logits, fresh(), rtol=0, atol=0)
    with torch.no_grad():
        other.eval()
        torch.testing.assert_close(model(feats, mask).logits, other(feats, mask).logits, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("blocks", ["whole", "small"])
def test_key_bank_equals_plain_autograd_and_updates_the_statistics_once(training, blocks, monkeypatch):
    """_KeyBank (block-sized temporaries, deferred score gradients, batch norm's backward in place) gives
    the plain autograd keys, gradients (of the features, the projection and the batch norm, through scores
    that each depend on the previous ones, plus a direct use of the keys) and running statistics."""
    import skim.model as sm

    if (
        blocks == "small"
    ):  # 3 valid rows per block and 2 videos per block: every block loop runs several times
        monkeypatch.setattr(sm, "KEY_BLOCK_ROWS", 3)
        monkeypatch.setattr(sm, "KEY_BLOCK_VIDEOS", 2)
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([6, 2, 0, 4, 5])  # a video with no valid row: its block has no rows
    b, n, d = 5, 6, 8
    mask = torch.arange(n)[None, :] < lengths[:, None]  # (B, N)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    z0 = torch.randn(b * n, d, generator=g, dtype=torch.float64)  # (B*N, D)
    w_out = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    q0 = torch.randn(b, d, generator=g, dtype=torch.float64)
    results = []
    for custom in (False, True):
        torch.manual_seed(0)
        proj = nn.Linear(d, d).double()
        bn = MaskedBatchNorm1d(d).double().train(training)
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.weight.uniform_(0.5, 1.5)
        z = z0.clone().requires_grad_(True)
        buf: list = []
        if custom:
            bank = sm._KeyBank.apply(
                z, rows, proj.weight, proj.bias, bn.weight, bn.bias, bn, True, (b, n), buf
            )  # fmt: skip
        else:
            k = torch.relu(bn.normalize_rows(proj(z.index_select(0, rows))))
            bank = z.new_zeros(b * n, d).index_copy(0, rows, k).view(b, n, d)
        q, total = q0, (bank * w_out).sum()
        for _ in range(4):  # each query depends on the previous scores, as in the model
            s = sm._Scores.apply(bank, q, buf) if custom else torch.einsum("bnd,bd->bn", bank, q)
            a = torch.where(mask, s, float("-inf")).softmax(1).nan_to_num(0.0)
            q = torch.tanh(torch.einsum("bn,bnd->bd", a, z.view(b, n, d)) + q)
            total = total + (a * torch.arange(float(n))).sum() + q.sum()
        total.backward()
        params = [z.grad, proj.weight.grad, proj.bias.grad, bn.weight.grad, bn.bias.grad]
        stats = [bn.running_mean, bn.running_var, bn.num_batches_tracked]
        results.append((bank.detach(), params, stats))
        assert not buf  # the deferred gradients were consumed
    (bank_a, grads_a, stats_a), (bank_b, grads_b, stats_b) = results
    assert (bank_b[~mask] == 0).all() and (bank_b > 0).any()
    torch.testing.assert_close(bank_b, bank_a)
    for a, b_ in zip(grads_a + stats_a, grads_b + stats_b, strict=True):
        torch.testing.assert_close(b_, a)
    assert int(stats_b[2]) == int(training)


def test_finite_float32_batches_are_used_without_a_copy_and_never_written():
    """Padding reaches no output through raw float32 input (no (B, N, D) copy), NaN padding is zeroed on a
    copy, and the caller's tensors are never modified."""
    from skim.model import _zero_padding

    cfg = SkimConfig(**SMALL)
    feats, mask = make_batch(cfg, [7, 3], seed=2, pad_value=5.0)
    z = feats["image"]
    assert _zero_padding(z, mask) is z
    nan = torch.where(mask[..., None], z, torch.nan)
    before = nan.clone()
    clean = _zero_padding(nan, mask)
    assert clean.data_ptr() != nan.data_ptr() and (clean[~mask] == 0).all()
    torch.testing.assert_close(nan, before, equal_nan=True)
    half = _zero_padding(nan.half(), mask)
    assert half.dtype == torch.float32 and (half[~mask] == 0).all()
    torch.manual_seed(0)
    model = SkimModel(cfg).eval()
    outs = [model(make_batch(cfg, [7, 3], seed=2, pad_value=p)[0], mask) for p in (0.0, 5.0, float("nan"))]
    for out in outs[1:]:
        torch.testing.assert_close(out.logits, outs[0].logits, rtol=0, atol=0)
        torch.testing.assert_close(out.attention, outs[0].attention, rtol=0, atol=0)


def test_precision_is_fp32_unless_asked_and_bf16_only_on_native_hardware(monkeypatch):
    import skim.model as sm
    from indexing.errors import ConfigError

    model = SkimModel(SkimConfig(**SMALL))
    assert model.precision == "fp32"
    with pytest.raises(ConfigError, match="choose from auto, fp32, bf16"):
        model.set_precision("fp16")
    assert sm.resolve_precision("auto", "cuda") == "fp32"  # the GPU keeps fp32 results
    monkeypatch.setattr(sm, "native_bf16", lambda: False)  # an AVX2-only host
    assert model.set_precision("auto") == "fp32"
    with pytest.raises(ConfigError, match="native bf16"):
        model.set_precision("bf16")


def test_bf16_loop_is_close_to_fp32_and_follows_parameter_changes():
    """On a CPU with native bf16 the bf16 loop stays within bf16 rounding of fp32 with the same picks where
    the attention is decisive; elsewhere asking for it is refused (test above). Its weight copies are
    rebuilt after an optimiser step."""
    import skim.model as sm

    cfg = SkimConfig(**SMALL)
    torch.manual_seed(0)
    model = SkimModel(cfg)
    with torch.no_grad():  # decisive attention: large keys and queries
        model.key_bn[0].weight.fill_(6.0)
        model.key_bn[1].weight.fill_(6.0)
    warm_up(model, cfg)
    feats, mask = make_batch(cfg, [9, 4, 7], seed=5)
    if not sm.native_bf16():
        assert sm.resolve_precision("auto") == "fp32"
        return
    with torch.no_grad():
        ref = model(feats, mask)
        assert model.set_precision("bf16") == "bf16"
        low = model(feats, mask)
    torch.testing.assert_close(low.logits, ref.logits, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(low.chosen, ref.chosen)
    assert not torch.equal(low.logits, ref.logits)  # the bf16 path ran
    # The packed and the plain bf16 product agree.
    lin = sm._Bf16Linear(model.psi[0].weight, model.psi[0].bias)
    x = torch.randn(3, lin.weight.shape[1])
    plain = torch.nn.functional.linear(x.bfloat16(), lin.weight).float() + lin.bias
    torch.testing.assert_close(lin(x), plain, atol=1e-2, rtol=1e-2)
    # Training is fp32 whatever the setting, and the copies follow the new weights.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.loss(model(feats, mask), torch.tensor([0, 1, 2])).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(feats, mask)
        model.set_precision("fp32")
        after_ref = model(feats, mask)
    torch.testing.assert_close(after.logits, after_ref.logits, atol=2e-2, rtol=2e-2)


def test_heap_growth_limit_applies_on_glibc_and_frees_batch_sized_blocks():
    """With the fixed thresholds a freed batch-sized tensor (64 MB: features, key banks) goes back to the
    system, while row blocks under 32 MB (the key path's 16 MB blocks) are reused from the heap: allocating
    one again and again touches no new memory."""
    import platform

    from skim.train import limit_heap_growth

    if platform.libc_ver()[0] != "glibc":
        assert limit_heap_growth() is False
        return
    assert limit_heap_growth() is True
    assert limit_heap_growth() is True  # idempotent

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

    before = rss_mb()
    big = torch.ones(64 << 18)  # 64 MB touched
    assert rss_mb() > before + 56
    del big
    assert rss_mb() < before + 4  # returned on free
    import resource

    block = torch.ones(16 << 18)  # 16 MB touched, from the heap
    del block
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        block = torch.ones(16 << 18)
        del block
    # heap pages again: a block's worth of page faults at most (a fresh mapping per block faults 5 x 4,096)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 2 * 4096
    assert rss_mb() < before + 40  # and the heap keeps two blocks at most, not one per allocation


def test_inference_keys_in_row_blocks_equal_the_whole_projection(monkeypatch):
    """Without autograd the eval-mode key bank is filled in blocks of rows: the same values bit for bit."""
    import skim.model as sm

    cfg = SkimConfig(**SMALL)
    torch.manual_seed(0)
    model = SkimModel(cfg)
    warm_up(model, cfg)
    feats, mask = make_batch(cfg, [9, 4, 7], seed=6)
    with torch.enable_grad():
        whole = model(feats, mask)  # autograd path: one projection of all valid rows
    monkeypatch.setattr(sm, "KEY_BLOCK_ROWS", 3)  # 20 valid rows in 7 blocks
    with torch.no_grad():
        blocks = model(feats, mask)
    torch.testing.assert_close(blocks.logits, whole.logits.detach(), rtol=0, atol=0)
    torch.testing.assert_close(blocks.attention, whole.attention.detach(), rtol=0, atol=0)


def test_bench_reference_manner_stand_in_computes_over_padding_and_trains():
    """bench/skimming.py's stand-in of the reference's model manner: keys over every padded position (the
    key batch norm counts padding), ten Psi inputs, and a gradient for every parameter in the loss path."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("bench_skimming", bench / "skimming.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench))
    torch.manual_seed(0)
    model = mod.reference_manner_model(4, dim=8, hidden=12, steps=10).train()
    calls = []
    model.psi.register_forward_hook(lambda *_: calls.append(1))
    mask = torch.arange(20)[None, :] < torch.tensor([20, 12, 15])[:, None]  # (B, N)
    image, audio = (torch.randn(3, 20, 8) * mask[..., None] for _ in range(2))
    logits = model(image, audio, mask.float())
    assert logits.shape == (3, 4) and len(calls) == 10
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for name in ("key_image.0.weight", "query_audio.0.weight", "psi.0.weight", "classifier.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    conv, bn = model.key_image[0], model.key_image[1]
    with torch.no_grad():
        proj = conv(image.permute(0, 2, 1).unsqueeze(-1)).squeeze(-1)  # (B, D, N) incl. padded positions
    every = 0.1 * proj.mean((0, 2))  # momentum 0.1 from zero: the mean over all 60 positions
    valid = 0.1 * proj.permute(0, 2, 1)[mask].mean(0)
    torch.testing.assert_close(bn.running_mean, every)
    assert not torch.allclose(bn.running_mean, valid)
