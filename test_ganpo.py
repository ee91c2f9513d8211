"""Tests: CPU only, offline, float32 unless bf16 is what a test checks. pytest.ini runs them on two
worker processes (pytest-xdist): about 100 s on 2 cores, about 46 s without the `slow` ones, which
start new processes. `-n 0` runs them in this process (for one test, or a debugger).

    HF_HUB_OFFLINE=1 python -m pytest -q test_ganpo.py              # all
    HF_HUB_OFFLINE=1 python -m pytest -q test_ganpo.py -m "not slow"   # no new processes

Each test is named for the property it checks. Models are the `tiny` random Llama (with the
packaged SmolLM2 tokenizer, so chat templates and special tokens are real).
"""
import contextlib
import copy
import importlib.util
import io
import json
import math
import os
import runpy
import signal
import subprocess
import sys
import time
import types
from contextlib import nullcontext
from unittest import mock

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N processes share the cores, so one thread each,
    os.environ["OMP_NUM_THREADS"] = "1"      # also in the processes they start (read when torch loads)

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import ganpo
import loading
import scaleout
import train

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_FLAGS = ["--model", "tiny", "--disc_dim", "32", "--disc_heads", "2", "--max_length", "64",
              "--max_prompt_length", "40", "--batch_size", "4", "--log_every", "1",
              "--dtype", "fp32"]  # auto would pick bf16 on CPUs with bf16 units: exact on any CPU

SMALL_D = ganpo.GANPOConfig(disc_dim=32, disc_heads=2)  # discriminators to match the tiny model
EMA_KEYS = {f"{side}/{role}" for side in ("chosen", "rejected") for role in ("real", "fake", "contrast")}


@pytest.fixture(scope="session")
def tokenizer():
    return loading.load_tokenizer("tiny")


def make_rows(n, seed=0):
    """Conversational rows with a clear preference (positive vs negative review)."""
    good = ["Great place, I loved it.", "Wonderful and friendly staff!", "Excellent, would return.", "Superb value."]
    bad = ["Awful, never again.", "Terrible service and cold food.", "Bad.", "Disappointing and dirty, sadly."]
    return [{"prompt": [{"role": "user", "content": f"Review place number {i + seed}."}],
             "chosen": [{"role": "assistant", "content": good[i % 4]}],
             "rejected": [{"role": "assistant", "content": bad[(i + 1) % 4]}]} for i in range(n)]


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(40)))
    return str(path)


def tiny_policy(tokenizer, seed=0):
    return loading.load_policy("tiny", tokenizer, seed)


def batch_of(tokenizer, rows, max_length=64):
    examples, _ = loading.tokenize_rows(rows, tokenizer, max_length, 40)
    return loading.collate(examples, tokenizer.pad_token_id)


# -------------------------------------------------------------- ganpo.py: log-probs and latents

@pytest.mark.parametrize("temperature", [1.0, 1.5])  # 1.5: eval.py's tempered KL at T = 1.5
def test_summed_logps_equal_a_brute_force_loop_over_positions(tokenizer, temperature):
    policy = tiny_policy(tokenizer)
    batch = batch_of(tokenizer, make_rows(3))
    sum_logps, n_tokens, hidden = ganpo.forward_logps_and_hidden(policy, batch, temperature=temperature)
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits / temperature
    for i in range(batch["input_ids"].shape[0]):
        total, count = 0.0, 0
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["completion_mask"][i, t]:  # token t is predicted by the logits at t−1
                total += torch.log_softmax(logits[i, t - 1].double(), -1)[batch["input_ids"][i, t]].item()
                count += 1
        assert sum_logps[i].item() == pytest.approx(total, rel=1e-5)
        assert n_tokens[i].item() == count
    assert hidden.shape == (*batch["input_ids"].shape, policy.config.hidden_size)
    if temperature != 1:  # a different distribution: not the untempered log-probs
        assert not torch.allclose(sum_logps, ganpo.forward_logps_and_hidden(policy, batch)[0])


def test_chunked_logps_equal_unchunked_and_simpo_ipo_use_length_averaged_logps(tokenizer):
    policy = tiny_policy(tokenizer)
    batch = batch_of(tokenizer, make_rows(2))
    a, n, _ = ganpo.forward_logps_and_hidden(policy, batch, chunk_tokens=7)
    b, _, _ = ganpo.forward_logps_and_hidden(policy, batch, chunk_tokens=10_000)
    torch.testing.assert_close(a, b)
    ref = a.detach() - 1.0
    simpo = ganpo.opo_loss(ganpo.GANPOConfig(loss="simpo", beta=2.0, gamma=0.5), a, ref, n)
    torch.testing.assert_close(simpo, ganpo.simpo_loss(a[:2] / n[:2], a[2:] / n[2:], 2.0, 0.5))
    ipo = ganpo.opo_loss(ganpo.GANPOConfig(loss="ipo", beta=0.1), a, ref, n)
    torch.testing.assert_close(ipo, ganpo.ipo_loss(a[:2] / n[:2], a[2:] / n[2:], ref[:2] / n[:2], ref[2:] / n[2:], 0.1))


def test_lm_head_never_sees_more_rows_than_logits_chunk(tokenizer):
    """A large vocabulary's float32 logits exist one chunk at a time, in the forward and in the backward."""
    policy = tiny_policy(tokenizer)
    rows = []
    policy.get_output_embeddings().register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    batch = batch_of(tokenizer, make_rows(4))
    logps, n_tokens, _ = ganpo.forward_logps_and_hidden(policy, batch, chunk_tokens=16)
    logps.sum().backward()
    assert n_tokens.sum() > 16 * 3  # several chunks ...
    assert max(rows) <= 16 and sum(rows) == 2 * int(n_tokens.sum())  # ... each recomputed once in the backward


def test_hidden_states_are_the_last_layer_after_the_final_norm_and_logps_are_float32_under_bf16(tokenizer):
    policy = tiny_policy(tokenizer).eval()
    batch = batch_of(tokenizer, make_rows(2))
    with torch.no_grad():
        _, _, hidden = ganpo.forward_logps_and_hidden(policy, batch)
        full = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(),
                      output_hidden_states=True)
        torch.testing.assert_close(hidden, full.hidden_states[-1])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, _, _ = ganpo.forward_logps_and_hidden(policy, batch, chunk_tokens=5)
    assert logps.dtype == torch.float32 and torch.isfinite(logps).all()
    exact, _, _ = ganpo.forward_logps_and_hidden(policy, batch)
    torch.testing.assert_close(logps, exact, rtol=2e-2, atol=0.5)  # bf16 matmuls, float32 reduction


def test_a_rows_logps_and_discriminator_score_do_not_change_when_batched_with_a_longer_row(tokenizer):
    policy = tiny_policy(tokenizer).eval()
    disc = ganpo.Discriminator(policy.config.hidden_size, d_disc=32, n_heads=2).eval()
    short = make_rows(1)
    long = make_rows(1, seed=5)
    long[0]["rejected"][0]["content"] = "An extremely long rejected answer " * 6
    alone, pair = batch_of(tokenizer, short), batch_of(tokenizer, short + long)
    assert pair["input_ids"].shape[1] > alone["input_ids"].shape[1]
    with torch.no_grad():
        lp_alone, _, h_alone = ganpo.forward_logps_and_hidden(policy, alone)
        lp_pair, _, h_pair = ganpo.forward_logps_and_hidden(policy, pair)
        for which in ("attention_mask", "completion_mask"):
            s_alone = disc(h_alone, alone[which])
            s_pair = disc(h_pair, pair[which])
            # rows: alone = [chosen0, rejected0]; pair = [chosen0, chosen1, rejected0, rejected1]
            torch.testing.assert_close(s_pair[[0, 2]], s_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp_pair[[0, 2]], lp_alone, atol=1e-4, rtol=1e-5)


def test_dpo_loss_is_ln2_and_rewards_zero_at_step_0(tokenizer):
    policy = tiny_policy(tokenizer)
    ref = ganpo.make_reference(policy)
    m = ganpo.evaluate(policy, ref, [batch_of(tokenizer, make_rows(4))], ganpo.GANPOConfig(), nullcontext)
    assert m["opo/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["rewards/chosen"] == 0 and m["rewards/rejected"] == 0 and m["rewards/accuracies"] == 0


# ------------------------------------------------------------------------ ganpo.py: base losses

def test_dpo_loss_matches_hand_computed_value():
    pc, pr, rc, rr = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.5])
    delta = (-10 + 11) - (-12 + 11.5)  # 1.5
    expected = -math.log(1 / (1 + math.exp(-0.1 * delta)))
    assert ganpo.dpo_loss(pc, pr, rc, rr, beta=0.1).item() == pytest.approx(expected, rel=1e-6)
    smoothed = 0.8 * expected + 0.2 * -math.log(1 / (1 + math.exp(0.1 * delta)))
    assert ganpo.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2).item() == pytest.approx(smoothed, rel=1e-6)


def test_simpo_loss_matches_hand_computed_value():
    # β=2, γ=0.5, mean log-probs -1.0 and -1.5: −log σ(2·0.5 − 0.5) = −log σ(0.5)
    loss = ganpo.simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)), rel=1e-6)


def test_ipo_loss_matches_hand_computed_value():
    # Δ = (−1 + 1.2) − (−2 + 1.5) = 0.7; 1/(2β) = 5 at β=0.1: (0.7 − 5)² = 18.49
    loss = ganpo.ipo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.2]), torch.tensor([-1.5]), 0.1)
    assert loss.item() == pytest.approx(18.49, rel=1e-6)


@pytest.mark.parametrize("loss, beta, r_w, r_l", [
    ("dpo", 0.1, [0.1, -0.2], [-0.2, 0.3]),  # β·(sum log π_θ − sum log π_ref)
    ("simpo", 2.0, [-4.0, -4.0], [-10.0, -6.0]),  # β·(sum log π_θ / |y|), no reference
    ("ipo", 0.1, [0.02, -0.2 / 15], [-0.05, 0.075])])  # β·(log π_θ − log π_ref), both per token
def test_logged_rewards_accuracy_and_margin_are_those_of_the_base_loss(loss, beta, r_w, r_l):
    # pairs [chosen; rejected]: summed log-probs, the reference's, response lengths
    policy = torch.tensor([-10.0, -30.0, -20.0, -12.0])
    ref = torch.tensor([-11.0, -28.0, -18.0, -15.0])
    n_tokens = torch.tensor([5, 15, 4, 4])
    m = ganpo.preference_metrics(ganpo.GANPOConfig(loss=loss, beta=beta), policy, ref, n_tokens, torch.zeros(2))
    assert m["rewards/chosen"].item() == pytest.approx(sum(r_w) / 2, abs=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(sum(r_l) / 2, abs=1e-6)
    assert m["rewards/margins"].item() == pytest.approx((r_w[0] - r_l[0] + r_w[1] - r_l[1]) / 2, abs=1e-6)
    # the second pair: DPO and IPO rank it wrong, SimPO (−2 > −3 per token) right
    assert m["rewards/accuracies"].item() == (1.0 if loss == "simpo" else 0.5)
    assert m["logps/chosen"].item() == -20.0  # sums under every loss


# ------------------------ ganpo.py: the discriminator, the adversarial losses and running means

def bce(z, t):  # −[t·log σ(z) + (1−t)·log(1−σ(z))], by hand
    s = 1 / (1 + math.exp(-z))
    return -(t * math.log(s) + (1 - t) * math.log(1 - s))


def test_quad_and_generator_losses_match_hand_computed_values():
    a, f, n = torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([-1.0])
    ma, mf, mn = 1.0, 0.0, -0.5
    expected = 0.25 * (bce(2 - mf, 1) + bce(0.5 - ma, 0) + bce(0.5 - mn, 1) + bce(-1 - mf, 0))
    assert ganpo.quad_disc_loss(a, f, n, ma, mf, mn).item() == pytest.approx(expected, rel=1e-6)
    g = ganpo.generator_loss(torch.tensor([0.3]), torch.tensor([-0.2]), 1.0, -1.0)
    assert g.item() == pytest.approx(0.5 * (bce(0.3 - 1, 1) + bce(-0.2 + 1, 1)), rel=1e-6)


def test_ragan_losses_match_their_formulas_by_hand():
    a, f = torch.tensor([2.0, 0.0]), torch.tensor([1.0, -1.0])
    # L_D = ½·[BCE(a − m̄_f, 1) + BCE(f − m̄_a, 0)], batch means inside each BCE
    expected = 0.5 * ((bce(2 - 0.5, 1) + bce(0 - 0.5, 1)) / 2 + (bce(1 - 1.5, 0) + bce(-1 - 1.5, 0)) / 2)
    assert ganpo.pair_loss(a, f, 1.5, 0.5).item() == pytest.approx(expected, rel=1e-6)
    # L_G = ½·[BCE(f − m̄_a, 1) + BCE(a − mean(f), 0)]; mean(f) = 0
    expected = 0.5 * ((bce(1 - 1.5, 1) + bce(-1 - 1.5, 1)) / 2 + (bce(2 - 0, 0) + bce(0 - 0, 0)) / 2)
    f.requires_grad_(True)
    g = ganpo.ragan_generator_loss(f, a, 1.5)
    assert g.item() == pytest.approx(expected, rel=1e-6)
    g.backward()  # the second term reaches f through its batch mean: each f gets ½·½·σ(a_j − mean f)/2 summed
    by_hand = [0.5 * (-(1 - 1 / (1 + math.exp(-(x - 1.5)))) / 2) - 0.5 * sum(1 / (1 + math.exp(-(y - 0))) for y in (2, 0)) / 2 / 2
               for x in (1.0, -1.0)]
    torch.testing.assert_close(f.grad, torch.tensor(by_hand))


class FeatureScore(torch.nn.Module):
    """A stand-in discriminator with a known score: w · (masked mean of hidden feature 0)."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(w)))

    def forward(self, hidden, mask):
        return self.w * ganpo.mean_pool(hidden[..., :1], mask)[:, 0]


def latents(values):
    """(B, 2, 3) hidden states whose feature 0 is `values` on both tokens."""
    h = torch.zeros(len(values), 2, 3)
    h[:, :, 0] = torch.tensor(values)[:, None]
    return h


def test_discriminator_loss_splits_into_its_two_pairs_with_their_accuracies_by_hand():
    discs = torch.nn.ModuleDict({"chosen": FeatureScore(1.0), "rejected": FeatureScore(-1.0)})
    real = {"chosen": latents([2.0, 0.0]), "rejected": latents([-1.0, 0.5])}
    fake = {"chosen": latents([1.0, 1.0]), "rejected": latents([0.0, 3.0])}
    mask = {k: torch.ones(2, 2, dtype=torch.bool) for k in ("chosen", "rejected")}
    ema = {}
    m = ganpo.discriminator_backward(discs, real, fake, mask, ganpo.GANPOConfig(), ema, 1, nullcontext)
    # D_w: a = [2, 0], f = [1, 1], n = [−1, 0.5]; first running means = batch means: m̄_a = 1, m̄_f = 1, m̄_n = −0.25
    rf = 0.5 * ((bce(2 - 1, 1) + bce(0 - 1, 1)) / 2 + (bce(1 - 1, 0) + bce(1 - 1, 0)) / 2)
    ct = 0.5 * ((bce(1 + 0.25, 1) + bce(1 + 0.25, 1)) / 2 + (bce(-1 - 1, 0) + bce(0.5 - 1, 0)) / 2)
    assert m["disc/chosen/real_fake_loss"].item() == pytest.approx(rf, rel=1e-6)
    assert m["disc/chosen/contrast_loss"].item() == pytest.approx(ct, rel=1e-6)
    assert m["disc/chosen/loss"].item() == pytest.approx((rf + ct) / 2, rel=1e-6)  # quad = ½·(pair + pair)
    assert m["disc/chosen/real_fake_acc"].item() == 0.5  # 2 > 1 yes, 0 > 1 no
    assert m["disc/chosen/contrast_acc"].item() == 1.0  # 1 > −1, 1 > 0.5
    # D_l scores −feature: a' = [1, −0.5], f' = [0, −3], p' = [−2, 0]; m̄ = 0.25, −1.5, −1
    rf_l = 0.5 * ((bce(1 + 1.5, 1) + bce(-0.5 + 1.5, 1)) / 2 + (bce(0 - 0.25, 0) + bce(-3 - 0.25, 0)) / 2)
    ct_l = 0.5 * ((bce(0 + 1, 1) + bce(-3 + 1, 1)) / 2 + (bce(-2 + 1.5, 0) + bce(0 + 1.5, 0)) / 2)
    assert m["disc/rejected/real_fake_loss"].item() == pytest.approx(rf_l, rel=1e-6)
    assert m["disc/rejected/contrast_loss"].item() == pytest.approx(ct_l, rel=1e-6)
    assert m["disc/rejected/real_fake_acc"].item() == 1.0 and m["disc/rejected/contrast_acc"].item() == 0.5
    assert m["disc/real_fake_acc"].item() == 0.75 and m["disc/loss"].item() == pytest.approx((rf + ct + rf_l + ct_l) / 4)
    assert discs["chosen"].w.grad is not None  # quad trains D
    # ragan: the loss is the real/fake pair alone; the contrastive pair is still logged
    discs.zero_grad()
    m = ganpo.discriminator_backward(discs, real, fake, mask, ganpo.GANPOConfig(disc_loss="ragan"), {}, 1, nullcontext)
    assert m["disc/chosen/loss"].item() == pytest.approx(rf, rel=1e-6)
    assert m["disc/chosen/contrast_loss"].item() == pytest.approx(ct, rel=1e-6)
    # frozen: same figures, no gradient, eval mode
    discs.zero_grad()
    m = ganpo.discriminator_backward(discs, real, fake, mask, ganpo.GANPOConfig(), {}, 1, nullcontext,
                                    learn=False)
    assert m["disc/chosen/loss"].item() == pytest.approx((rf + ct) / 2, rel=1e-6)
    assert discs["chosen"].w.grad is None and not discs.training


class RecordingScore(FeatureScore):
    """FeatureScore that records, per call, whether its logits keep a gradient graph."""

    def __init__(self, w):
        super().__init__(w)
        self.graphs = []

    def forward(self, hidden, mask):
        out = super().forward(hidden, mask)
        self.graphs.append(out.requires_grad)
        return out


@pytest.mark.parametrize("disc_loss, graphs", [("quad", [True, True, True]), ("ragan", [True, True, False])])
def test_a_role_no_loss_uses_is_scored_without_a_graph_and_the_losses_read_roles_by_name(disc_loss, graphs,
                                                                                      monkeypatch):
    real = {"chosen": latents([2.0, 0.0]), "rejected": latents([-1.0, 0.5])}
    fake = {"chosen": latents([1.0, 1.0]), "rejected": latents([0.0, 3.0])}
    mask = {k: torch.ones(2, 2, dtype=torch.bool) for k in ("chosen", "rejected")}
    cfg, results = ganpo.GANPOConfig(disc_loss=disc_loss), []
    for order in (lambda d: d, lambda d: dict(reversed(list(d.items())))):  # score's dict in either order
        discs = torch.nn.ModuleDict({"chosen": RecordingScore(1.0), "rejected": RecordingScore(-1.0)})
        score = ganpo.score
        monkeypatch.setattr(ganpo, "score", lambda *a, **kw: order(score(*a, **kw)))
        results.append(ganpo.discriminator_backward(discs, real, fake, mask, cfg, {}, 1, nullcontext))
        monkeypatch.setattr(ganpo, "score", score)
        assert discs["chosen"].graphs == graphs and discs["rejected"].graphs == graphs  # real, fake, contrast
    assert results[0] == results[1] and results[0]["disc/chosen/contrast_loss"] > 0  # the contrast pair, logged


def test_under_bf16_autocast_the_discriminator_gradients_are_those_of_one_call_scoring_all_three_roles():
    """Autocast caches each weight's bf16 copy within one context, and the three roles' gradients sum
    through it: scoring them in one context keeps the rounding of the step the recorded runs took."""
    torch.manual_seed(0)
    discs = torch.nn.ModuleDict({s: ganpo.Discriminator(8, 16, n_heads=2, dropout=0.0) for s in ("chosen", "rejected")})
    twin = copy.deepcopy(discs)
    h = {s: torch.randn(3, 5, 8) for s in ("real_chosen", "real_rejected", "fake_chosen", "fake_rejected")}
    real, fake = {s: h[f"real_{s}"] for s in ("chosen", "rejected")}, {s: h[f"fake_{s}"] for s in ("chosen", "rejected")}
    mask = {s: torch.ones(3, 5, dtype=torch.bool) for s in ("chosen", "rejected")}
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    ganpo.discriminator_backward(discs, real, fake, mask, ganpo.GANPOConfig(), {}, 1, bf16)
    twin.train()
    for side in ("chosen", "rejected"):  # by hand: one score() call, three roles, one context
        with bf16():
            a, f, n = ganpo.score(twin, side, real, fake, mask).values()
        means = [x.detach().float().mean() for x in (a, f, n)]  # first running means: the batch means
        ganpo.quad_disc_loss(a, f, n, *means).backward()
    grads = [(p.grad, q.grad) for p, q in zip(discs.parameters(), twin.parameters())]
    assert all(torch.equal(g, t) for g, t in grads) and any(float(g.abs().max()) > 0 for g, _ in grads)


def test_running_means_start_at_first_value_then_decay():
    ema = {}
    ganpo.update_ema(ema, {"k": torch.tensor([1.0, 3.0])}, 0.9)
    assert ema["k"].item() == pytest.approx(2.0)
    ganpo.update_ema(ema, {"k": torch.tensor([12.0])}, 0.9)
    assert ema["k"].item() == pytest.approx(0.9 * 2 + 0.1 * 12)



def test_latent_mmd_equals_a_brute_force_double_loop_is_zero_for_identical_latents_and_grows_with_a_shift():
    torch.manual_seed(0)
    B, T, d = 5, 6, 4
    real = {side: torch.randn(B, T, d) for side in ("chosen", "rejected")}
    fake = {side: real[side] + 0.3 * torch.randn(B, T, d) for side in ("chosen", "rejected")}
    mask = {side: torch.rand(B, T) > 0.3 for side in ("chosen", "rejected")}
    for side in mask:
        mask[side][:, 0] = True

    def pooled(side):
        x = [fake[side][i][mask[side][i]].mean(0) for i in range(B)]
        y = [real[side][i][mask[side][i]].mean(0) for i in range(B)]
        return x, y, [float((y[i] - y[j]).norm()) for i in range(B) for j in range(B) if i != j]
    total = 0.0
    for side in ("chosen", "rejected"):
        x, y, dist = pooled(side)
        sigma2 = torch.tensor(dist).median().item() ** 2  # torch's median: the lower middle value
        k = lambda a, b: math.exp(-float((a - b).pow(2).sum()) / (2 * sigma2))  # noqa: E731
        h = [k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i]) for i in range(B) for j in range(B) if i != j]
        total += sum(h) / (B * (B - 1)) / 2
    assert ganpo.latent_mmd(real, fake, mask).item() == pytest.approx(total, rel=1e-5)
    assert ganpo.latent_mmd(real, real, mask).item() == pytest.approx(0.0, abs=1e-7)
    shifts = [ganpo.latent_mmd(real, {s: real[s] + c for s in real}, mask).item() for c in (0.1, 0.5, 2.0)]
    assert 0 < shifts[0] < shifts[1] < shifts[2]
    grad_to = {s: v.clone().requires_grad_() for s, v in fake.items()}
    ganpo.latent_mmd(real, grad_to, mask).backward()
    assert grad_to["chosen"].grad.abs().sum() > 0


def test_chosen_nll_is_the_token_weighted_nll_of_the_chosen_responses():
    logps = torch.tensor([-6.0, -2.0, -9.0, -1.0])  # [chosen; rejected], B = 2
    n_tokens = torch.tensor([3, 1, 4, 2])
    assert ganpo.chosen_nll(logps, n_tokens).item() == pytest.approx((6.0 + 2.0) / (3 + 1))

# ----------------------------------------------------------------- ganpo.py: one optimizer step

def setup_models(tokenizer, adv_weight=1.0, lr=1e-3):
    torch.manual_seed(0)
    policy = tiny_policy(tokenizer)
    ref = ganpo.make_reference(policy)
    discs = ganpo.build_discriminators(policy.config.hidden_size, SMALL_D) if adv_weight > 0 else None
    popt = torch.optim.AdamW(policy.parameters(), lr=lr)
    dopt = torch.optim.AdamW(discs.parameters(), lr=lr) if discs is not None else None
    return policy, ref, discs, popt, dopt


def test_discriminator_loss_sends_no_gradient_to_the_policy_and_generator_loss_none_to_discriminators(tokenizer):
    policy, ref, discs, _, _ = setup_models(tokenizer)
    cfg = ganpo.GANPOConfig(adv_weight=1.0)
    batch = batch_of(tokenizer, make_rows(4))
    disc_state = {k: v.clone() for k, v in discs.state_dict().items()}  # incl. spectral-norm power-iteration vectors
    torch.manual_seed(1)
    out = ganpo.forward_both(policy, ref, batch, cfg, nullcontext)  # one micro-step, the simultaneous order
    real, fake, mask = ganpo.split_latents(batch, out["policy"][2], out["ref"][1], "all")
    ema_step = {}
    ganpo.discriminator_backward(discs, real, {k: v.detach() for k, v in fake.items()}, mask, cfg, ema_step, 1,
                                 nullcontext)
    ganpo.policy_backward(out, batch, discs, cfg, ema_step, 1, nullcontext)
    policy_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    disc_grads = {n: p.grad.clone() for n, p in discs.named_parameters()}
    # recompute each part alone with the same dropout draws
    policy.zero_grad()
    discs.zero_grad()
    discs.load_state_dict(disc_state)
    torch.manual_seed(1)
    logps, n_tok, hidden = ganpo.forward_logps_and_hidden(policy, batch)
    with torch.no_grad():
        ref_logps, _, ref_hidden = ganpo.forward_logps_and_hidden(ref, batch)
    B = 4
    m = batch["attention_mask"]
    discs.train()
    discs.requires_grad_(True)
    logits = {"chosen/real": discs["chosen"](ref_hidden[:B], m[:B]), "chosen/fake": discs["chosen"](hidden[:B].detach(), m[:B]),
              "chosen/contrast": discs["chosen"](ref_hidden[B:], m[B:]), "rejected/real": discs["rejected"](ref_hidden[B:], m[B:]),
              "rejected/fake": discs["rejected"](hidden[B:].detach(), m[B:]), "rejected/contrast": discs["rejected"](ref_hidden[:B], m[:B])}
    ema = {}
    ganpo.update_ema(ema, logits, 0.9)
    d_loss = sum(ganpo.quad_disc_loss(logits[f"{s}/real"], logits[f"{s}/fake"], logits[f"{s}/contrast"],
                                      ema[f"{s}/real"], ema[f"{s}/fake"], ema[f"{s}/contrast"]) for s in ("chosen", "rejected"))
    d_loss.backward()
    for n, p in discs.named_parameters():
        torch.testing.assert_close(p.grad, disc_grads[n])  # the generator loss added nothing to D's gradients
    assert all(p.grad is None for p in policy.parameters())  # D's loss sends nothing to the policy
    discs.zero_grad()
    discs.eval()
    discs.requires_grad_(False)
    g = ganpo.generator_loss(discs["chosen"](hidden[:B], m[:B]), discs["rejected"](hidden[B:], m[B:]),
                             ema["chosen/real"], ema["rejected/real"])
    (ganpo.opo_loss(cfg, logps, ref_logps, n_tok).mean() + g).backward()
    for n, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, policy_grads[n])
    assert all(p.grad is None for p in discs.parameters())
    # and the generator loss really reaches the policy through D
    policy.zero_grad()
    ganpo.opo_loss(cfg, *ganpo.forward_logps_and_hidden(policy, batch)[:1], ref_logps, n_tok).mean().backward()
    assert any(not torch.allclose(p.grad, policy_grads[n]) for n, p in policy.named_parameters())


def test_an_optimizer_step_of_each_side_changes_only_its_own_weights(tokenizer):
    policy, ref, discs, popt, dopt = setup_models(tokenizer)
    batch = batch_of(tokenizer, make_rows(4))
    p0 = {n: p.detach().clone() for n, p in policy.named_parameters()}
    d0 = {n: p.detach().clone() for n, p in discs.named_parameters()}
    frozen_policy_opt = torch.optim.SGD(policy.parameters(), lr=0.0)  # step D only
    ganpo.ganpo_step(policy, ref, discs, frozen_policy_opt, dopt, [batch], ganpo.GANPOConfig(), {}, nullcontext)
    assert all(torch.equal(p, p0[n]) for n, p in policy.named_parameters())
    assert any(not torch.equal(p, d0[n]) for n, p in discs.named_parameters())
    d1 = {n: p.detach().clone() for n, p in discs.named_parameters()}
    frozen_disc_opt = torch.optim.SGD(discs.parameters(), lr=0.0)  # step the policy only
    ganpo.ganpo_step(policy, ref, discs, popt, frozen_disc_opt, [batch], ganpo.GANPOConfig(), {}, nullcontext)
    assert all(torch.equal(p, d1[n]) for n, p in discs.named_parameters())
    assert any(not torch.equal(p, p0[n]) for n, p in policy.named_parameters())
    assert all(p.grad is None for p in list(policy.parameters()) + list(discs.parameters()))  # grads zeroed


def test_reference_is_frozen_and_the_discriminators_step_once_per_optimizer_step(tokenizer):
    policy, ref, discs, popt, dopt = setup_models(tokenizer)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    rows = make_rows(4)
    ema = {}
    ganpo.ganpo_step(policy, ref, discs, popt, dopt, [batch_of(tokenizer, rows[:2]), batch_of(tokenizer, rows[2:])],
                     ganpo.GANPOConfig(), ema, nullcontext)
    assert {int(s["step"]) for s in dopt.state.values()} == {1}  # two micro-batches, one discriminator step
    assert {int(s["step"]) for s in popt.state.values()} == {1}
    assert set(ema) == EMA_KEYS


def test_disc_steps_2_takes_exactly_two_discriminator_optimizer_steps_per_policy_step(tokenizer):
    policy, ref, discs, popt, dopt = setup_models(tokenizer)
    rows = make_rows(4)
    calls = []
    dopt.register_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    for _ in range(2):
        ganpo.ganpo_step(policy, ref, discs, popt, dopt, [batch_of(tokenizer, rows[:2]), batch_of(tokenizer, rows[2:])],
                         ganpo.GANPOConfig(disc_steps=2), {}, nullcontext)
    assert len(calls) == 4  # 2 policy steps x 2 discriminator steps, whatever the micro-batches
    assert {int(s["step"]) for s in dopt.state.values()} == {4}
    assert {int(s["step"]) for s in popt.state.values()} == {2}



@pytest.mark.parametrize("control", ["mmd", "rpo"])
def test_the_non_adversarial_controls_add_their_weighted_term_and_are_logged_on_every_run(tokenizer, control):
    batch = batch_of(tokenizer, make_rows(4))
    plain, ref, _, _, _ = setup_models(tokenizer, adv_weight=0)
    m0 = ganpo.ganpo_step(plain, ref, None, torch.optim.SGD(plain.parameters(), lr=1.0), None, [batch],
                          ganpo.GANPOConfig(adv_weight=0), {}, nullcontext)
    assert m0["latent/mmd"] == 0.0 and m0["nll/chosen"] > 0  # logged for DPO; untrained, the policy is π_ref
    # against another reference (at π_θ = π_ref MMD² is 0 and stationary): DPO, then DPO + the control
    other = ganpo.make_reference(tiny_policy(tokenizer, seed=1))
    flags = {"latent_reg": "mmd", "latent_weight": 3.0} if control == "mmd" else {"rpo_alpha": 0.5}
    steps = []
    for cfg in (ganpo.GANPOConfig(adv_weight=0), ganpo.GANPOConfig(adv_weight=0, **flags)):
        policy = tiny_policy(tokenizer)
        m = ganpo.ganpo_step(policy, other, None, torch.optim.SGD(policy.parameters(), lr=1.0), None, [batch], cfg,
                             {}, nullcontext, max_grad_norm=0)
        steps.append((m, [p.detach().clone() for p in policy.parameters()]))
    (m_dpo, w_dpo), (m, w) = steps
    assert m_dpo["latent/mmd"] > 0 and m["latent/mmd"] == m_dpo["latent/mmd"] and m["nll/chosen"] == m_dpo["nll/chosen"]
    term = 3.0 * m["latent/mmd"] if control == "mmd" else 0.5 * m["nll/chosen"]
    assert m_dpo["loss"] == m_dpo["opo/loss"] and m["loss"] == pytest.approx(m["opo/loss"] + term, rel=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(w, w_dpo))  # its gradient reached the policy

@pytest.mark.parametrize("disc_steps, halves", [(1, False), (2, False), (1, True)])
def test_alternating_update_the_policy_meets_the_discriminators_after_all_their_steps(tokenizer, disc_steps,
                                                                                       halves):
    """L_G of the step equals one computed by hand through the post-step discriminators (after both
    steps with --disc_steps 2), from the pre-step policy; through D before its last step it differs.
    halves: two micro-batches, where the policy's forward runs again for its backward."""
    policy, ref, discs, popt, dopt = setup_models(tokenizer)
    policy_0 = ganpo.make_reference(policy)  # a frozen copy of the policy before the step
    rows = make_rows(4)
    micro = [batch_of(tokenizer, rows[:2]), batch_of(tokenizer, rows[2:])] if halves else [batch_of(tokenizer, rows)]
    before_last = []
    dopt.register_step_pre_hook(lambda opt, args, kwargs: before_last.append(
        {k: v.clone() for k, v in discs.state_dict().items()}))
    ema = {}
    m = ganpo.ganpo_step(policy, ref, discs, popt, dopt, micro, ganpo.GANPOConfig(disc_steps=disc_steps), ema,
                         nullcontext)
    assert len(before_last) == disc_steps

    def by_hand():
        discs.eval()
        losses = []
        with torch.no_grad():
            for b in micro:
                h = ganpo.forward_logps_and_hidden(policy_0, b)[2]
                B, mask = h.shape[0] // 2, b["attention_mask"]
                losses.append(ganpo.generator_loss(discs["chosen"](h[:B], mask[:B]), discs["rejected"](h[B:], mask[B:]),
                                                   ema["chosen/real"], ema["rejected/real"]))
        return float(torch.stack(losses).mean())
    assert m["gen/loss"] == pytest.approx(by_hand(), rel=1e-5)
    discs.load_state_dict(before_last[-1])  # D before its last step
    assert abs(m["gen/loss"] - by_hand()) > 1e-4


def test_simultaneous_update_the_policy_meets_the_discriminators_before_their_step(tokenizer):
    policy, ref, discs, popt, dopt = setup_models(tokenizer)
    policy_0 = ganpo.make_reference(policy)
    batch = batch_of(tokenizer, make_rows(4))
    d_0 = {k: v.clone() for k, v in discs.state_dict().items()}
    ema = {}
    m = ganpo.ganpo_step(policy, ref, discs, popt, dopt, [batch], ganpo.GANPOConfig(update="simultaneous"), ema,
                         nullcontext)
    stepped = {k: v.clone() for k, v in discs.state_dict().items()}
    mask = batch["attention_mask"]
    with torch.no_grad():
        h = ganpo.forward_logps_and_hidden(policy_0, batch)[2]

    def through(state):  # D's weights, with the spectral-norm vectors of the training-mode pass
        discs.load_state_dict({k: (v if "_u" in k or "_v" in k else state[k]) for k, v in stepped.items()})
        discs.eval()
        with torch.no_grad():
            return float(ganpo.generator_loss(discs["chosen"](h[:4], mask[:4]), discs["rejected"](h[4:], mask[4:]),
                                              ema["chosen/real"], ema["rejected/real"]))
    assert m["gen/loss"] == pytest.approx(through(d_0), rel=1e-5)
    assert abs(m["gen/loss"] - through(stepped)) > 1e-4



@pytest.mark.parametrize("k", [1, 2])
def test_frozen_discriminators_play_the_same_game_in_either_order(tokenizer, k):
    """With nothing to step, alternating and simultaneous are one computation (so the grid runs no
    frozen -sim cell), also over micro-batches, where m̄ moves between them."""
    rows = make_rows(4)
    micro = [batch_of(tokenizer, rows[i:i + 4 // k]) for i in range(0, 4, 4 // k)]
    runs = []
    for update in ("alternating", "simultaneous"):
        policy, ref, discs, popt, _ = setup_models(tokenizer)
        m = ganpo.ganpo_step(policy, ref, discs, popt, None, micro, ganpo.GANPOConfig(update=update), {}, nullcontext)
        runs.append((m, [p.detach().clone() for p in policy.parameters()]))
    assert runs[0][0] == runs[1][0] and runs[0][0]["gen/loss"] > 0
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1]))

def test_xavier_init_draws_weights_within_the_glorot_bound_zero_biases_and_unit_spectral_norms():
    torch.manual_seed(0)
    d = ganpo.Discriminator(48, 64, n_heads=4, init="xavier").eval()
    originals = {n: p for n, p in d.named_parameters() if p.dim() == 2 and n != "pos"}
    assert len(originals) == 3 + 2 * 4  # proj, head x2; per layer in_proj, out_proj, 2 FFN
    for name, w in originals.items():
        bound = math.sqrt(6 / sum(w.shape))
        assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
    assert all(float(p.detach().abs().max()) == 0 for n, p in d.named_parameters() if n.endswith("bias"))
    for layer in (d.proj, d.head[0]):  # σ was estimated after the init: the normalised weight's norm is 1
        assert torch.linalg.matrix_norm(layer.weight, 2).item() == pytest.approx(1.0, rel=0.05)
    layers = d.encoder.layers
    assert not torch.equal(layers[0].linear1.weight, layers[1].linear1.weight)
    torch.manual_seed(0)
    t = ganpo.Discriminator(48, 64, n_heads=4, init="torch")
    assert float(t.proj.parametrizations.weight.original.abs().max()) <= 1 / math.sqrt(48)  # torch's bound
    assert torch.equal(t.encoder.layers[0].linear1.weight, t.encoder.layers[1].linear1.weight)  # copies


def sigma_estimate(layer, d_in):
    """σ's estimate after one more train-mode call (one power iteration), as a share of the true σ."""
    layer.train()(torch.zeros(1, d_in))
    return 1 / float(torch.linalg.matrix_norm(layer.eval().weight.detach(), 2))  # W / σ_est, read in eval mode


def test_the_legacy_spectral_norm_starts_from_a_low_estimate_of_sigma_and_ours_near_it():
    """--disc_sn legacy (the authors' hook): random u, v and no warm-up, so the first estimate of σ is
    low and the layer acts larger than 1-Lipschitz; ours starts after 15 power iterations."""
    firsts = {}
    for sn in ("torch", "legacy"):
        torch.manual_seed(0)
        d = ganpo.Discriminator(96, 128, n_heads=4, sn=sn)
        firsts[sn] = sigma_estimate(d.proj, 96)
        later = [sigma_estimate(d.proj, 96) for _ in range(30)][-1]
        assert later > 0.97 and later >= firsts[sn]
    assert firsts["torch"] > 0.95 and firsts["legacy"] < 0.8


def test_sn_start_script_measures_the_legacy_hooks_low_first_estimate_on_the_smollm2_shapes():
    """docs/departures.md quotes scripts/sn_start.py: legacy 0.68-0.71 of σ at the first call, ours 0.96-0.99."""
    sn_start = script_module("scripts", "sn_start.py")
    legacy, ours = sn_start.estimates("legacy", 0), sn_start.estimates("torch", 0)
    for layer in ("576 -> 512", "512 -> 512"):
        assert 0.65 < legacy[layer][0] < 0.75 and 0.9 < legacy[layer][2] < legacy[layer][3] <= 1.0 + 1e-6
        assert 0.95 < ours[layer][0] <= 1.0 + 1e-6


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_discriminator_gradients_are_clipped_only_when_disc_max_grad_norm_is_set(tokenizer, clip):
    policy, ref, discs, popt, _ = setup_models(tokenizer)
    dopt = torch.optim.SGD(discs.parameters(), lr=1.0)  # SGD: the update is the (clipped) gradient
    d_0 = [p.detach().clone() for p in discs.parameters()]
    m = ganpo.ganpo_step(policy, ref, discs, popt, dopt, [batch_of(tokenizer, make_rows(4))],
                         ganpo.GANPOConfig(disc_max_grad_norm=clip), {}, nullcontext)
    moved = math.sqrt(sum(float((p.detach() - q).pow(2).sum()) for p, q in zip(discs.parameters(), d_0)))
    assert m["disc/grad_norm"] > 1e-2  # the norm before clipping
    assert moved == pytest.approx(clip or m["disc/grad_norm"], rel=1e-3)


def test_frozen_discriminators_keep_their_initial_weights_bit_for_bit_while_the_policy_trains(tokenizer):
    policy, ref, discs, popt, _ = setup_models(tokenizer)
    d0 = {k: v.clone() for k, v in discs.state_dict().items()}  # incl. the spectral-norm vectors
    p0 = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ema = {}
    for _ in range(3):
        m = ganpo.ganpo_step(policy, ref, discs, popt, None, [batch_of(tokenizer, make_rows(4))],
                             ganpo.GANPOConfig(), ema, nullcontext)
    assert all(torch.equal(v, d0[k]) for k, v in discs.state_dict().items())
    assert all(p.grad is None for p in discs.parameters()) and "disc/grad_norm" not in m
    assert m["gen/loss"] > 0 and any(not torch.equal(p, p0[n]) for n, p in policy.named_parameters())


def test_adv_weight_zero_gives_the_same_weights_as_a_plain_dpo_step(tokenizer):
    # SGD, not Adam: Adam's first step is ~lr·sign(g), which amplifies float noise in near-zero grads
    policy, ref, discs, _, _ = setup_models(tokenizer, adv_weight=0)
    assert discs is None
    batch = batch_of(tokenizer, make_rows(4))
    popt = torch.optim.SGD(policy.parameters(), lr=1.0)
    ganpo.ganpo_step(policy, ref, None, popt, None, [batch], ganpo.GANPOConfig(adv_weight=0), {}, nullcontext)
    # the textbook DPO step, written independently: full logits, log_softmax, gather, mask
    plain, plain_ref, _, _, _ = setup_models(tokenizer, adv_weight=0)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1.0)

    def seq_logps(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits[:, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return (lp * batch["completion_mask"][:, 1:]).sum(-1)
    pol = seq_logps(plain)
    with torch.no_grad():
        rf = seq_logps(plain_ref)
    loss = -F.logsigmoid(0.1 * ((pol[:4] - rf[:4]) - (pol[4:] - rf[4:]))).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
    plain_opt.step()
    moved = 0
    for (n, p), q, p0 in zip(policy.named_parameters(), plain.parameters(), plain_ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
        moved += int(not torch.equal(p, p0))
    assert moved > 0  # the step did something


@pytest.mark.parametrize("adv_weight", [0.0])
def test_gradient_accumulation_over_two_half_batches_matches_one_full_batch(tokenizer, adv_weight):
    rows = make_rows(4)
    rows[0]["chosen"][0]["content"] = "A far longer chosen answer, so the halves pad to different lengths."
    cfg = ganpo.GANPOConfig(adv_weight=adv_weight)
    full, ref, _, _, _ = setup_models(tokenizer, adv_weight)
    opt_full = torch.optim.SGD(full.parameters(), lr=1.0)
    m_full = ganpo.ganpo_step(full, ref, None, opt_full, None, [batch_of(tokenizer, rows)], cfg, {}, nullcontext,
                              max_grad_norm=0)
    halves, ref2, _, _, _ = setup_models(tokenizer, adv_weight)
    opt_halves = torch.optim.SGD(halves.parameters(), lr=1.0)
    m_half = ganpo.ganpo_step(halves, ref2, None, opt_halves, None,
                              [batch_of(tokenizer, rows[:2]), batch_of(tokenizer, rows[2:])], cfg, {}, nullcontext,
                              max_grad_norm=0)
    for p, q in zip(full.parameters(), halves.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert m_full["loss"] == pytest.approx(m_half["loss"], rel=1e-5)
    assert m_full["policy/grad_norm"] == pytest.approx(m_half["policy/grad_norm"], rel=1e-4)


@pytest.mark.parametrize("players, k, forwards", [("dpo", 2, 1), ("frozen", 2, 1), ("learning", 1, 1),
                                                  ("learning", 2, 2)])
def test_the_policy_runs_a_second_forward_only_when_a_discriminator_steps_between_its_micro_batches(
        tokenizer, players, k, forwards):
    """Phase 1's forward serves phase 3 unless the discriminators step in between with k > 1."""
    policy, ref, discs, popt, dopt = setup_models(tokenizer, adv_weight=0 if players == "dpo" else 1)
    calls = {"policy": 0, "ref": 0}
    for name, model in (("policy", policy), ("ref", ref)):  # after make_reference: hooks are not copied
        model.get_decoder().register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    rows = make_rows(4)
    micro = [batch_of(tokenizer, rows[i:i + 4 // k]) for i in range(0, 4, 4 // k)]
    cfg = ganpo.GANPOConfig(adv_weight=0 if players == "dpo" else 1)
    ganpo.ganpo_step(policy, ref, discs, popt, dopt if players == "learning" else None, micro, cfg, {}, nullcontext)
    assert calls == {"policy": forwards * k, "ref": k}


def trajectory(tokenizer, micro_pairs, cfg, hold=(), steps=6):
    """`steps` optimizer steps of 8 new pairs each, as micro-batches of `micro_pairs` pairs -> (each step's
    metrics, the policy's weights at the end). AdamW for both players. hold: what to keep the same however
    the pairs are split: "running means" (every m̄ stays 0) and "power iteration" (σ's estimate stays at its
    start; each train-mode call of a discriminator runs one iteration, so 8 micro-batches run 8 times as many)."""
    torch.manual_seed(0)
    policy = tiny_policy(tokenizer)
    ref = ganpo.make_reference(policy)
    discs = ganpo.build_discriminators(policy.config.hidden_size, cfg) if cfg.adv_weight else None
    for module in (discs.modules() if "power iteration" in hold else ()):
        if hasattr(module, "n_power_iterations"):
            module.n_power_iterations = 0
    popt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    dopt = torch.optim.AdamW(discs.parameters(), lr=1e-3) if discs is not None else None
    rows, ema, metrics = make_rows(8 * steps), {}, []
    held = mock.patch.object(ganpo, "update_ema", lambda ema, logits, decay: ema.update(
        {key: torch.tensor(0.0) for key in logits})) if "running means" in hold else nullcontext()
    with held:
        for s in range(steps):
            pairs = rows[8 * s:8 * s + 8]
            micro = [batch_of(tokenizer, pairs[i:i + micro_pairs]) for i in range(0, 8, micro_pairs)]
            metrics.append(ganpo.ganpo_step(policy, ref, discs, popt, dopt, micro, cfg, ema, nullcontext))
    return metrics, [p.detach().clone() for p in policy.parameters()]


def trajectory_gap(tokenizer, cfg, hold=(), steps=6):
    """1 x 8 pairs against 8 x 1 pair a step -> the largest differences: per-step loss, margin; final weights."""
    (ma, wa), (mb, wb) = (trajectory(tokenizer, k, cfg, hold, steps) for k in (8, 1))
    return (max(abs(x["loss"] - y["loss"]) for x, y in zip(ma, mb)),
            max(abs(x["rewards/margins"] - y["rewards/margins"]) for x, y in zip(ma, mb)),
            max(float((p - q).abs().max()) for p, q in zip(wa, wb)))


def test_dpo_follows_the_same_trajectory_whether_a_step_is_one_batch_of_8_or_8_micro_batches_of_1(tokenizer):
    loss, margin, weights = trajectory_gap(tokenizer, ganpo.GANPOConfig(adv_weight=0))
    assert loss < 1e-6 and margin < 1e-6 and weights < 1e-5  # measured: 1.2e-07, 2.1e-07, 6.5e-07


def test_ganpo_is_not_accumulation_invariant_and_its_running_means_and_power_iterations_are_why(tokenizer):
    """m̄ moves once per micro-batch, so 8 micro-batches average other logits than one batch does; and each
    train-mode discriminator call runs a power iteration. Dropout off, so its masks are not a third cause."""
    cfg = ganpo.GANPOConfig(disc_dim=32, disc_heads=2, disc_dropout=0.0)
    free = trajectory_gap(tokenizer, cfg, steps=2)  # two steps show it (six: the same loss gap)
    means_held = trajectory_gap(tokenizer, cfg, hold=("running means",), steps=2)
    both_held = trajectory_gap(tokenizer, cfg, hold=("running means", "power iteration"), steps=2)
    assert free[0] > 1e-2 and free[2] > 1e-3  # measured: loss 4.4e-02, weights 4.0e-03
    assert 1e-3 < means_held[0] < free[0] / 5  # measured: 2.2e-03, most of the gap was the running means
    assert both_held[0] < 1e-6 and both_held[1] < 1e-6 and both_held[2] < 1e-5  # measured: 0, 0, 9.3e-07


# ------------------------------------------------------------------ ganpo.py: watching the game

def test_auc_counts_ties_as_half_and_a_feature_scoring_discriminator_gets_its_hand_computed_auc(tokenizer):
    assert ganpo.auc(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 2.0])) == 0.5
    assert ganpo.auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0])) == 0.75
    policy = tiny_policy(tokenizer).eval()
    ref = ganpo.make_reference(policy)
    with torch.no_grad():
        policy.model.norm.weight[0] += 0.5  # feature 0 of the policy's latents moves
    batch = batch_of(tokenizer, make_rows(6))
    discs = torch.nn.ModuleDict({"chosen": FeatureScore(1.0), "rejected": FeatureScore(-1.0)})
    result = ganpo.evaluate(policy, ref, [batch], ganpo.GANPOConfig(), nullcontext, discs=discs)
    with torch.no_grad():
        feat = {name: ganpo.mean_pool(ganpo.forward_logps_and_hidden(m, batch)[2][..., :1], batch["attention_mask"])[:, 0]
                for name, m in (("policy", policy), ("ref", ref))}

    def by_hand(above, below):  # a plain double loop
        wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in above.tolist() for y in below.tolist())
        return wins / (len(above) * len(below))
    ref_w, ref_l, pol_w, pol_l = feat["ref"][:6], feat["ref"][6:], feat["policy"][:6], feat["policy"][6:]
    expected = {"chosen/auc_real_fake": by_hand(ref_w, pol_w), "chosen/auc_fake_contrast": by_hand(pol_w, ref_l),
                "rejected/auc_real_fake": by_hand(-ref_l, -pol_l), "rejected/auc_fake_contrast": by_hand(-pol_l, -ref_w)}
    for key, value in expected.items():
        assert result[f"disc/{key}"] == pytest.approx(value, abs=1e-12), key
    assert result["disc/auc_real_fake"] == pytest.approx((expected["chosen/auc_real_fake"] + expected["rejected/auc_real_fake"]) / 2)
    assert expected["chosen/auc_real_fake"] != 0.5  # the feature really moved


# ----------------------------------------------------------- loading.py: rows, tokens and masks

def test_completion_mask_excludes_prompt_and_padding_and_includes_final_end_of_turn(tokenizer):
    rows = make_rows(2)
    rows[1]["chosen"][0]["content"] = "A much longer answer that forces the other rows to be padded on the right."
    batch = batch_of(tokenizer, rows)
    ids, mask, att = batch["input_ids"], batch["completion_mask"], batch["attention_mask"]
    for i in range(ids.shape[0]):
        scored = ids[i][mask[i]].tolist()
        text = tokenizer.decode(scored)
        # the completion is the assistant content plus the template's end of turn, nothing of the prompt
        assert text.endswith("<|im_end|>\n") and "<|im_start|>" not in text and "user" not in text
        assert not mask[i][~att[i]].any()  # padding is never scored
        last = int(att[i].nonzero().max())
        assert mask[i, last] and ids[i, last - 1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (~att).any()  # the batch really had padding (pad id = <|im_end|> here)
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_standard_rows_score_an_appended_eos_even_though_pad_is_eos(tokenizer):
    rows = [{"prompt": "Rate the hotel:", "chosen": " Lovely.", "rejected": " Dreadful and loud all night long."}]
    batch = batch_of(tokenizer, rows)
    eos = tokenizer.eos_token_id
    for i in range(2):
        scored = batch["input_ids"][i][batch["completion_mask"][i]].tolist()
        assert scored[-1] == eos and scored.count(eos) == 1
    assert tokenizer.decode(batch["input_ids"][0][batch["completion_mask"][0]]) == " Lovely." + tokenizer.eos_token


def test_a_token_merged_across_the_prompt_boundary_moves_to_the_completion(tokenizer):
    row = {"prompt": "I really like pizz", "chosen": "a with olives", "rejected": "as and pasta"}
    ex = loading.tokenize_row(row, tokenizer, 128, 64)
    prompt_ids = tokenizer(row["prompt"])["input_ids"]
    assert ex["boundary_merged"] and ex["prompt"] == prompt_ids[:len(ex["prompt"])] and len(ex["prompt"]) < len(prompt_ids)
    for k in ("chosen", "rejected"):  # the scored sequence is exactly tokens(prompt + completion + EOS)
        assert ex["prompt"] + ex[k] == tokenizer(row["prompt"] + row[k] + tokenizer.eos_token)["input_ids"]


def test_chat_rows_render_one_system_prompt_and_the_whole_conversation_once(tokenizer):
    batch = batch_of(tokenizer, make_rows(1))
    text = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0]])
    assert text.count("<|im_start|>system") == 1 and text.count("<|im_start|>assistant") == 1


def test_truncation_keeps_prompt_end_then_cuts_completion_and_drops_empty_rows(tokenizer):
    row = {"prompt": "one two three four five six seven eight nine ten", "chosen": " yes indeed", "rejected": " no"}
    ex = loading.tokenize_row(row, tokenizer, max_length=8, max_prompt_length=5)
    full_prompt = tokenizer(row["prompt"])["input_ids"]
    assert ex["prompt"] == full_prompt[-5:]  # the prompt's end survives
    assert len(ex["prompt"]) + len(ex["chosen"]) <= 8 and len(ex["chosen"]) == 3  # " yes indeed" + EOS fits
    assert loading.tokenize_row(row, tokenizer, max_length=5, max_prompt_length=5) is None  # no room left
    kept, dropped = loading.tokenize_rows([row, row], tokenizer, 5, 5)
    assert kept == [] and dropped == 2


def test_implicit_prompt_rows_are_split_at_the_last_shared_message():
    conv = [{"role": "user", "content": "hi"}]
    row = {"chosen": conv + [{"role": "assistant", "content": "hello!"}],
           "rejected": conv + [{"role": "assistant", "content": "go away"}]}
    loading.check_row(row, "x")
    assert row["prompt"] == conv and row["chosen"] == [{"role": "assistant", "content": "hello!"}]


def test_bundled_data_has_the_promised_splits_counts_and_gaps():
    counts, cats = {}, {}
    for split in ("train", "test", "shift"):
        rows = loading.read_rows("bundled", split)
        counts[split] = len(rows)
        cats[split] = {r["category"] for r in rows}
        assert all(r["score_chosen"] - r["score_rejected"] >= 0.5 for r in rows)
    assert counts["train"] >= 1000 and counts["test"] >= 200 and counts["shift"] >= 200
    assert len(cats["train"]) >= 8 and cats["test"] <= cats["train"]
    assert len(cats["shift"]) >= 2 and not cats["shift"] & cats["train"]
    train_prompts = {r["prompt"][0]["content"] for r in loading.read_rows("bundled", "train")}
    assert not train_prompts & {r["prompt"][0]["content"] for r in loading.read_rows("bundled", "test")}


# ------------------------------------- scaleout.py: bf16 autocast and gradient checkpointing

BF16 = scaleout.precision("cpu", "bf16")[1]  # as train.py --dtype bf16: float32 weights, bf16 matmuls


def checkpointed_models(tokenizer, checkpointing=True):
    """The tiny policy in training mode, its reference and discriminators, as train.py
    --gradient_checkpointing builds them."""
    policy, ref, discs, popt, dopt = setup_models(tokenizer)
    if checkpointing:
        scaleout.enable_checkpointing(policy)
    return policy.train(), ref, discs, popt, dopt


def test_bf16_with_checkpointing_step_0_has_ln2_loss_zero_rewards_and_float32_logps(tokenizer):
    policy, ref, discs, popt, dopt = checkpointed_models(tokenizer)
    batch = batch_of(tokenizer, make_rows(4))
    out = ganpo.forward_both(policy, ref, batch, SMALL_D, BF16)
    logps = out["policy"][0]
    assert logps.dtype == torch.float32 and logps.requires_grad  # reduced in float32, graph kept
    with torch.no_grad():
        exact = ganpo.forward_logps_and_hidden(policy, batch)[0]
    assert not torch.equal(logps, exact)  # bf16 matmuls did run ...
    torch.testing.assert_close(logps.detach(), exact, rtol=2e-2, atol=0.5)  # ... summed in float32
    m = ganpo.ganpo_step(policy, ref, discs, popt, dopt, [batch], SMALL_D, {}, BF16)
    assert m["opo/loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy and reference compute alike
    assert m["rewards/chosen"] == 0 and m["rewards/rejected"] == 0 and m["rewards/margins"] == 0
    assert math.isfinite(m["gen/loss"]) and m["policy/grad_norm"] > 0


def test_bf16_gradients_with_checkpointing_equal_those_without_within_bf16_tolerance(tokenizer):
    grads = []
    for checkpointing in (False, True):
        policy, ref, discs, _, _ = checkpointed_models(tokenizer, checkpointing)
        cfg, batch, ema = SMALL_D, batch_of(tokenizer, make_rows(4)), {}
        torch.manual_seed(1)  # the same dropout masks in the discriminators
        out = ganpo.forward_both(policy, ref, batch, cfg, BF16)
        real, fake, mask = ganpo.split_latents(batch, out["policy"][2], out["ref"][1], "all")
        ganpo.discriminator_backward(discs, real, {k: v.detach() for k, v in fake.items()}, mask,
                                     cfg, ema, 1, BF16)  # the running means L_G reads
        ganpo.policy_backward(out, batch, discs, cfg, ema, 1, BF16)
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    no_ckpt, ckpt = grads
    assert no_ckpt.norm() > 0
    # the recomputed forward runs the same bf16 kernels on the same inputs: equal to bf16 rounding
    torch.testing.assert_close(ckpt, no_ckpt, rtol=1e-2, atol=1e-2 * no_ckpt.abs().max().item())
    assert (ckpt - no_ckpt).norm() <= 1e-2 * no_ckpt.norm()


def cuda_like(major, monkeypatch):
    """torch.cuda's queries answer as a GPU of compute capability `major`.x would; bf16 tensors
    can be made on it either way (a T4, 7.5, emulates them)."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d: True)


@pytest.mark.parametrize("major, bf16", [(7, False), (8, True), (9, True)])  # T4, A100, H100
def test_dtype_auto_picks_bf16_only_on_gpus_with_native_bf16(monkeypatch, major, bf16):
    cuda_like(major, monkeypatch)
    assert torch.cuda.is_bf16_supported()  # torch's default counts emulation: a T4 says yes
    assert scaleout.precision("cuda", "auto")[0] is bf16
    assert scaleout.precision("cuda", "fp32")[0] is False and scaleout.precision("cuda", "bf16")[0]


@pytest.mark.parametrize("units", [False, True])
def test_dtype_auto_on_a_cpu_picks_bf16_only_with_bf16_units(monkeypatch, units):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: units)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert scaleout.native_bf16("cpu") is units
    assert scaleout.precision("cpu", "auto")[0] is units
    assert scaleout.precision("cpu", "fp32")[0] is False and scaleout.precision("cpu", "bf16")[0]


# ------------------------------------------------- scaleout.py: LoRA, the reference is the base

def lora_policy(tokenizer, r=4, dropout=0.1):
    return scaleout.add_lora(tiny_policy(tokenizer), r=r, alpha=8, dropout=dropout)


def base_weights(policy):
    return {k: v.detach().clone() for k, v in policy.named_parameters() if "lora_" not in k}


def lora_steps(policy, ref, tokenizer, n, adv_weight=0.0, lr=1e-2, autocast=nullcontext):
    discs = ganpo.build_discriminators(64, SMALL_D) if adv_weight else None
    popt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    dopt = torch.optim.AdamW(discs.parameters(), lr=lr) if discs is not None else None
    cfg, ema = ganpo.GANPOConfig(adv_weight=adv_weight), {}
    return [ganpo.ganpo_step(policy, ref, discs, popt, dopt, [batch_of(tokenizer, make_rows(4, seed=i))], cfg, ema,
                             autocast) for i in range(n)]


@pytest.mark.parametrize("bf16", [False, True])
def test_lora_step_0_has_zero_rewards_and_ln2_loss_and_the_reference_is_no_copy(tokenizer, bf16):
    if bf16:  # as train.py --lora_r --dtype bf16: a bf16 base under bf16 autocast, float32 adapters
        policy = scaleout.add_lora(loading.load_policy("tiny", tokenizer, 0, dtype=torch.bfloat16), r=4, alpha=8, dropout=0.1)
    else:
        policy = lora_policy(tokenizer)
    ref = ganpo.make_reference(policy)
    assert isinstance(ref, scaleout.AdaptersOff) and list(ref.parameters()) == []  # no second model
    policy.train()  # LoRA dropout on in the policy's forward: the adapters still add exactly 0 at step 0
    m = lora_steps(policy, ref, tokenizer, 1, autocast=scaleout.precision("cpu", "bf16" if bf16 else "fp32")[1])[0]
    assert m["opo/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["rewards/chosen"] == 0 and m["rewards/rejected"] == 0


def test_lora_trains_only_the_adapters_and_the_reference_never_moves(tokenizer):
    policy = lora_policy(tokenizer)
    ref = ganpo.make_reference(policy)
    trainable = {k for k, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    batch = batch_of(tokenizer, make_rows(6, seed=50))
    before = ganpo.forward_logps_and_hidden(ref, batch)
    base, adapters = base_weights(policy), {k: p.detach().clone() for k, p in policy.named_parameters() if p.requires_grad}
    policy.train()
    lora_steps(policy, ref, tokenizer, 3, adv_weight=1.0)  # GANPO: the discriminators' "real" latents come from ref
    assert all(torch.equal(v, base[k]) for k, v in base_weights(policy).items())  # base bit-identical
    assert any(not torch.equal(p, adapters[k]) for k, p in policy.named_parameters() if p.requires_grad)
    after = ganpo.forward_logps_and_hidden(ref, batch)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # reference log-probs and latents unchanged
    assert policy.training  # the reference forward put the policy back in train mode
    fresh = tiny_policy(tokenizer)  # the adapters switched off = the base model, freshly loaded
    with torch.no_grad():
        expected = ganpo.forward_logps_and_hidden(fresh, batch)
    assert torch.equal(after[0], expected[0]) and torch.equal(after[2], expected[2])
    policy_logps = ganpo.forward_logps_and_hidden(policy.eval(), batch)[0]
    assert (policy_logps - after[0]).abs().max() > 1e-3  # while the policy itself has moved


def test_lora_gradients_are_the_same_with_gradient_checkpointing(tokenizer):
    weights = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = lora_policy(tokenizer, dropout=0.0)
        if checkpointing:
            scaleout.enable_checkpointing(policy)
        policy.train()
        lora_steps(policy, ganpo.make_reference(policy), tokenizer, 2, adv_weight=1.0)
        weights.append({k: p.detach().clone() for k, p in policy.named_parameters() if p.requires_grad})
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])


# ------------------------------------------------------------------------------------- train.py

TEST_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_train(args, **kw):
    """`python train.py ARGS` as a user runs it, in a new process (~5 s of imports each time)."""
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True,
                          text=True, env=TEST_ENV, cwd=HERE, timeout=300, **kw)


def main_here(main, argv):
    """A script's main() run in this process, as `python SCRIPT ARGS` runs it but without starting an
    interpreter and importing torch and transformers again (~5 s each time).
    -> (exit status, stdout, stderr), with sys.exit("message") read as Python does: status 1."""
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # train.py sets them
    try:
        with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            main()
    except SystemExit as e:
        code = e.code or 0
        if isinstance(code, str):
            stderr.write(code + "\n")
            code = 1
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return code, stdout.getvalue(), stderr.getvalue()


def train_here(args, stop_during_step=None, signum=signal.SIGINT):
    """`python train.py ARGS`, in this process -> (exit status, all it printed).
    stop_during_step=k: a Ctrl-C (SIGINT, or `signum`) arrives while step k runs."""
    real_step, steps = ganpo.ganpo_step, []

    def step_then_ctrl_c(*a, **kw):
        out = real_step(*a, **kw)
        steps.append(1)
        if len(steps) - 1 == stop_during_step:
            signal.raise_signal(signum)  # train.py's handler: finish this step, save, exit
        return out
    with mock.patch.object(ganpo, "ganpo_step", step_then_ctrl_c):
        code, out, err = main_here(train.main, ["train.py", *args])
    return code, out + err


RUN_FLAGS = [*TINY_FLAGS, "--max_steps", "6", "--eval_every", "3", "--save_every", "100", "--lr", "1e-3"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_file):
    """One tiny GANPO run shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("runs") / "trained"
    code, printed = train_here([*RUN_FLAGS, "--data", data_file, "--output_dir", str(out)])
    assert code == 0, printed[-2000:]
    return out, printed


@pytest.fixture(scope="session")
def untrained_run(tmp_path_factory, data_file):
    """--max_steps 0: the untrained policy, saved; also exercises --label_noise."""
    out = tmp_path_factory.mktemp("runs") / "untrained"
    code, stdout = train_here([*TINY_FLAGS, "--data", data_file, "--output_dir", str(out), "--max_steps", "0",
                               "--label_noise", "0.25"])
    assert code == 0, stdout[-2000:]
    return out, stdout


def test_train_script_runs_tiny_model_and_writes_a_loadable_policy_and_metrics(trained_run):
    out, stdout = trained_run
    assert "eval held-out step 3" in stdout and "eval held-out step 6" in stdout
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in records if "split" not in r]
    assert [r["step"] for r in train_steps] == [0, 1, 2, 3, 4, 5]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "disc/loss", "gen/loss", "disc/real_fake_acc", "ema/chosen/real", "policy/grad_norm",
                "disc/grad_norm", "lr", "tokens_per_s"):
        assert key in train_steps[0], key
    assert train_steps[0]["opo/loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    evals = [r for r in records if r.get("split") == "held-out"]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["eval/rewards/margins"] > 0  # it learned something about the held-out pairs
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and set(state["ema"]) == EMA_KEYS and state["discs"] is not None


@pytest.mark.parametrize("units", [False, True])
def test_train_records_what_dtype_auto_picked_so_a_resume_keeps_it(tmp_path, data_file, monkeypatch, units):
    monkeypatch.setattr(scaleout, "native_bf16", lambda device: units)
    out, picked = tmp_path / "run", "bf16" if units else "fp32"
    code, printed = train_here([*TINY_FLAGS, "--dtype", "auto", "--data", data_file, "--output_dir", str(out),
                                "--max_steps", "0"])
    assert code == 0, printed[-2000:]
    assert f'"dtype": "{picked}"' in printed
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["dtype"] == picked


NEW_FLAGS = {"authors": [], "frozen": ["--disc_lr", "0"], "lora": ["--lora_r", "4", "--lora_alpha", "8"],
             "bf16-checkpointing": ["--dtype", "bf16", "--gradient_checkpointing"],
             "legacy-sn": ["--disc_sn", "legacy"],
             "fast-ragan-k2-response": ["--disc_lr", "3e-3", "--disc_steps", "2", "--disc_loss", "ragan",
                                        "--disc_tokens", "response"]}


def interrupted_then_resumed(out, flags):
    """train.py (in this process) gets a Ctrl-C during step 1, then resumes; -> the step it stopped at."""
    code, stdout = train_here([*flags, "--output_dir", str(out)], stop_during_step=1)
    assert code == 0 and "SIGINT: saved step 2" in stdout, stdout[-2000:]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 < state["config"]["max_steps"]  # it stopped early, after finishing the step
    code, stdout = train_here(["--output_dir", str(out), "--resume"])
    assert code == 0 and "resumed from step 2" in stdout, stdout[-2000:]
    return state["step"]


def signalled_then_resumed(out, flags):
    """`python train.py` in a process of its own gets a real Ctrl-C (SIGINT) once it has logged step 1,
    saves and exits 0; then it resumes. -> the step it stopped at."""
    proc = subprocess.Popen([sys.executable, "train.py", *flags, "--output_dir", str(out)], cwd=HERE,
                            env=TEST_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step 1 |" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, rest
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 2 <= state["step"] < state["config"]["max_steps"], rest  # it stopped early, after finishing a step
    code, printed = train_here(["--output_dir", str(out), "--resume"])
    assert code == 0 and f"resumed from step {state['step']}" in printed, printed[-3000:]
    return state["step"]


def assert_same_run(whole, stopped, weights="model.safetensors"):
    """Two run folders hold bit-identical weights, discriminators, running means and logged figures
    (each step logged once); -> the second's checkpoint and metrics without timings."""
    a, b = load_file(whole / weights), load_file(stopped / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (whole, stopped))
    assert sa["discs"].keys() == sb["discs"].keys() and all(torch.equal(sa["discs"][k], sb["discs"][k]) for k in sa["discs"])
    assert sa["ema"] == sb["ema"]
    timing = ("step_time", "tokens_per_s", "memory/peak_gib")
    lines = [[{k: v for k, v in json.loads(x).items() if k not in timing} for x in (d / "metrics.jsonl").read_text().splitlines()]
             for d in (whole, stopped)]
    assert lines[0] == lines[1]
    return sb, lines[1]


@pytest.mark.parametrize("variant", [pytest.param(v, marks=[pytest.mark.slow] if v == "authors" else [])
                                     for v in NEW_FLAGS])  # authors': a process of its own, slow
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, data_file, trained_run, variant):
    """authors': a real Ctrl-C to `python train.py`, against the subprocess run trained_run; the
    others in this process (train_here), whole and interrupted alike."""
    flags = [*RUN_FLAGS, "--data", data_file, *NEW_FLAGS[variant]]
    if variant == "authors":
        whole = trained_run[0]
        signalled_then_resumed(tmp_path / "stopped", flags)
    else:
        whole = tmp_path / "whole"
        assert train_here([*flags, "--output_dir", str(whole)])[0] == 0
        interrupted_then_resumed(tmp_path / "stopped", flags)
    sb, lines = assert_same_run(whole, tmp_path / "stopped",
                                "adapter_model.safetensors" if variant == "lora" else "model.safetensors")
    if variant == "frozen":
        assert sb["disc_opt"] is None and all(torch.equal(sb["discs"][f"{side}.{k}"], v)
                                              for side, init in sb["discs_init"].items() for k, v in init.items())
        assert {r["disc/chosen/weight_change"] for r in lines if "split" not in r} == {0.0}
    else:
        assert lines[-2]["disc/chosen/weight_change"] > 0


LORA_FLAGS = [*RUN_FLAGS, "--lora_r", "4", "--lora_alpha", "8", "--lr", "1e-2"]


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, data_file):
    out = tmp_path_factory.mktemp("runs") / "lora"
    code, stdout = train_here([*LORA_FLAGS, "--data", data_file, "--merge_lora", "--output_dir", str(out)])
    assert code == 0, stdout[-2000:]
    return out, stdout


def test_lora_run_saves_an_adapter_and_a_merged_model_with_the_same_logps(lora_run, tokenizer, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM
    out = lora_run[0]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["policy"] and all("lora_" in k for k in state["policy"])  # adapters only, not the base
    adapter = peft.PeftModel.from_pretrained(tiny_policy(tokenizer), out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    batch = batch_of(tokenizer, make_rows(40)[36:])  # the held-out pairs
    with torch.no_grad():
        a = ganpo.forward_logps_and_hidden(adapter, batch)[0]
        b = ganpo.forward_logps_and_hidden(merged, batch)[0]
        base = ganpo.forward_logps_and_hidden(tiny_policy(tokenizer), batch)[0]
    assert torch.allclose(a, b, atol=1e-4) and (a - base).abs().max() > 1e-3
    import eval as ev  # eval.py rebuilds the reference as the base and agrees with train.py's last evaluation
    final = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    held_out = str(tmp_path / "held.jsonl")
    with open(held_out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in make_rows(40)[36:])
    cfg = ev.EvalConfig(runs=[str(out)], data=held_out, split="x", gen_prompts=0, temperatures="", batch_size=4)
    res = ev.evaluate_run(str(out), cfg, None)["splits"]["x"]
    for key in ("rewards/margins", "rewards/chosen", "opo/loss", "disc/auc_real_fake"):
        assert res[key] == pytest.approx(final[f"eval/{key}"], rel=1e-4, abs=1e-5), key


def test_a_file_too_small_to_hold_out_a_pair_trains_without_held_out_evaluations(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(make_rows(1)[0]) + "\n")
    code, stdout = train_here([*TINY_FLAGS, "--data", str(path), "--max_steps", "2", "--eval_every", "1",
                               "--output_dir", str(tmp_path / "run")])
    assert code == 0, stdout[-2000:]
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_label_noise_swaps_a_seeded_fraction_of_training_pairs(untrained_run):
    # 40 rows, the last 10% held out, the first 32 of the rest kept (--model tiny: --limit 32)
    assert "label noise: swapped 8 of 32 training pairs" in untrained_run[1]


# ------------------------------------------------------------ train.py: bad input gets one line

def run_main(monkeypatch, capsys, args):
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    with pytest.raises(SystemExit) as e:
        train.main()
    err = capsys.readouterr().err.strip()
    return e.value.code, err


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", \n', "bad.jsonl:2: invalid JSON"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n', "bad.jsonl:2: missing field rejected"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}\n', "bad.jsonl:1: field chosen must be a string"),
    ('{"prompt": "' + "long " * 300 + '", "chosen": "b", "rejected": "c"}\n', "no pairs left after filtering"),
    (b"\xff\xfe\x00binary", "cannot read it"),
    ("", "bad.jsonl: no rows in this file"),
    ("\n   \n\n", "bad.jsonl: no rows in this file"),
])
def test_bad_data_gets_one_clear_line_naming_the_file_and_row(tmp_path, monkeypatch, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    extra = ["--max_prompt_length", "64"] if "long" in str(content) else []
    code, err = run_main(monkeypatch, capsys, [*TINY_FLAGS, *extra, "--data", str(path),
                                               "--output_dir", str(tmp_path / "out")])
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_unknown_model_and_existing_run_get_one_clear_line_and_nothing_is_overwritten(tmp_path, monkeypatch, capsys,
                                                                                        data_file):
    code, err = run_main(monkeypatch, capsys, ["--model", str(tmp_path / "no-such-model"), "--data", data_file,
                                               "--output_dir", str(tmp_path / "out")])
    assert code == 2 and "--model" in err and "\n" not in err
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"precious")
    code, err = run_main(monkeypatch, capsys, [*TINY_FLAGS, "--data", data_file, "--output_dir", str(out)])
    assert code == 2 and "--resume" in err
    assert (out / "checkpoint.pt").read_bytes() == b"precious"


def test_a_checkpoint_holding_more_than_tensors_is_refused_with_one_line_and_left_as_it_is(tmp_path, monkeypatch,
                                                                                          capsys, data_file):
    """checkpoint.pt loads with weights_only=True: a pickled object could run code on load."""
    import datetime
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"step": 1, "config": {}, "sent_by": datetime.datetime(2026, 1, 1)}, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    code, err = run_main(monkeypatch, capsys, [*TINY_FLAGS, "--data", data_file, "--output_dir", str(out), "--resume"])
    assert code == 2 and "\n" not in err
    assert err == (f"error: {out / 'checkpoint.pt'}: refused by torch.load(weights_only=True): it holds "
                   "datetime.datetime, which a checkpoint of train.py never does")
    assert (out / "checkpoint.pt").read_bytes() == before
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read it as a torch checkpoint"):
        loading.load_checkpoint(str(out / "checkpoint.pt"))


@pytest.mark.parametrize("field, value, message", [("disc_steps", 0, "disc_steps 0: expected at least 1"),
                                                   ("loss", "kto", "loss kto: expected dpo, simpo or ipo"),
                                                   ("ema_decay", 1.5, "ema_decay 1.5: expected [0, 1]"),
                                                   ("disc_heads", 3, "disc_heads 3: expected a divisor of disc_dim 32"),
                                                   ("beta", 0.0, "beta 0.0: expected > 0")])
def test_a_bad_method_setting_raises_one_value_error_naming_it_when_built_or_changed_before_a_step(
        tokenizer, field, value, message):
    with pytest.raises(ValueError) as built:
        ganpo.GANPOConfig(**{**SMALL_D.__dict__, field: value})
    assert str(built.value) == message
    cfg = ganpo.GANPOConfig(**SMALL_D.__dict__)
    setattr(cfg, field, value)  # a reader's edit after the config was built
    policy, ref, discs, popt, dopt = setup_models(tokenizer)
    with pytest.raises(ValueError) as stepped:
        ganpo.ganpo_step(policy, ref, discs, popt, dopt, [batch_of(tokenizer, make_rows(2))], cfg, {}, nullcontext)
    assert str(stepped.value) == message


def test_the_latent_mmd_control_on_a_micro_batch_of_one_pair_raises_instead_of_adding_zero(tokenizer):
    policy, ref, _, popt, _ = setup_models(tokenizer, adv_weight=0)
    with pytest.raises(ValueError, match="latent_reg mmd compares the pairs of a micro-batch: it needs at least 2"):
        ganpo.ganpo_step(policy, ref, None, popt, None, [batch_of(tokenizer, make_rows(1))],
                         ganpo.GANPOConfig(adv_weight=0, latent_reg="mmd"), {}, nullcontext)


@pytest.mark.parametrize("flags, message", [(["--disc_loss", "wgan"], "--disc_loss wgan: expected quad or ragan"),
                                            (["--disc_steps", "0"], "--disc_steps 0: expected at least 1"),
                                            (["--ema_decay", "2"], "--ema_decay 2.0: expected [0, 1]"),
                                            (["--disc_lr", "-1"], "--disc_lr and --disc_lr_ratio must be >= 0 (0 = frozen discriminators)")])
def test_bad_discriminator_flags_get_one_clear_line(tmp_path, monkeypatch, capsys, data_file, flags, message):
    code, err = run_main(monkeypatch, capsys, [*TINY_FLAGS, *flags, "--data", data_file, "--output_dir", str(tmp_path / "o")])
    assert code == 2 and err == f"error: {message}"
    assert not (tmp_path / "o").exists()


DISC_FLAGS = {"disc_dim": "64", "disc_layers": "1", "disc_heads": "4", "disc_dropout": "0.0", "disc_loss": "ragan",
              "disc_steps": "2", "disc_init": "torch", "disc_sn": "legacy", "disc_max_grad_norm": "1.0",
              "update": "simultaneous", "ema_decay": "0.5", "disc_lr": "0.001", "disc_tokens": "response"}


@pytest.mark.parametrize("flags, silent", [
    (["--gamma", "1"], ["gamma"]),
    (["--loss", "simpo", "--label_smoothing", "0.1"], ["label_smoothing"]),
    (["--loss", "ipo", "--label_smoothing", "0.1", "--gamma", "1"], ["gamma", "label_smoothing"]),
    (["--latent_weight", "3"], ["latent_weight"]),
    (["--adv_weight", "0", *[x for k, v in DISC_FLAGS.items() for x in (f"--{k}", v)]], list(DISC_FLAGS)),
    (["--adv_weight", "0", "--disc_lr_ratio", "2", "--latent_reg", "mmd", "--disc_tokens", "response"],
     ["disc_lr_ratio"]),  # under the MMD control --disc_tokens picks the tokens it compares
    (["--disc_lr", "0", "--disc_steps", "2", "--disc_dropout", "0", "--disc_max_grad_norm", "1", "--update",
      "simultaneous", "--ema_decay", "0.5"], ["disc_steps", "disc_dropout", "disc_max_grad_norm", "update"]),
    (["--disc_lr", "1e-3", "--disc_lr_ratio", "2"], ["disc_lr_ratio"]),
    (["--lora_alpha", "8", "--lora_dropout", "0", "--lora_targets", "q_proj"], ["lora_alpha", "lora_dropout",
                                                                               "lora_targets"]),
    (["--eval_every", "0", "--eval_pairs", "10"], ["eval_pairs"]),
    (["--data", "pairs.jsonl", "--train_split", "all", "--eval_split", "dev", "--final_eval_splits", "shift"],
     ["eval_split", "final_eval_splits", "train_split"]),
    (["--loss", "simpo", "--gamma", "1", "--label_smoothing", "0.1", "--latent_reg", "mmd", "--latent_weight", "3",
      "--disc_lr", "0", "--ema_decay", "0.5", "--lora_r", "4", "--lora_alpha", "8"], ["label_smoothing"])])
def test_every_setting_that_has_no_effect_under_the_others_gets_a_warning_line(monkeypatch, flags, silent):
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY_FLAGS, *flags])
    lines = train.settings_without_effect(train.parse_config())
    assert sorted(line.split()[0] for line in lines) == sorted(f"--{name}" for name in silent)
    assert all(" has no effect: " in line for line in lines)


def test_a_run_prints_each_warning_once_and_keeps_them_in_run_config_json(tmp_path, data_file, trained_run):
    code, printed = train_here([*TINY_FLAGS, "--data", data_file, "--max_steps", "0", "--gamma", "2",
                                "--output_dir", str(tmp_path / "run")])
    line = "--gamma 2.0 has no effect: only --loss simpo uses it (--loss dpo)"
    assert code == 0 and printed.count("warning:") == 1 and printed.count(f"warning: {line}\n") == 1
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["warnings"] == [line]
    out, stdout = trained_run  # a run whose flags all matter: no warning line, none recorded
    assert "warning:" not in stdout and json.loads((out / "run_config.json").read_text())["warnings"] == []


def test_lora_without_peft_gets_one_line_saying_what_to_install(tmp_path, monkeypatch, capsys, data_file):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    code, err = run_main(monkeypatch, capsys, [*TINY_FLAGS, "--data", data_file, "--lora_r", "4",
                                               "--output_dir", str(tmp_path / "run")])
    assert code == 2 and err == "error: --lora_r needs peft, which is not installed: pip install peft"


def test_batch_size_that_does_not_split_over_processes_gets_one_line_before_anything_loads(
        tmp_path, monkeypatch, capsys, data_file):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 sets in each process
    code, err = run_main(monkeypatch, capsys, [*TINY_FLAGS, "--data", data_file, "--batch_size", "6",
                                               "--grad_accum", "2", "--output_dir", str(tmp_path / "run")])
    assert code == 2 and err == "error: --batch_size 6 must be a multiple of 2 processes x --grad_accum 2"
    assert not (tmp_path / "run").exists()


HUB_MODEL = "ganpo-tests/tiny-llama"


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory, tokenizer):
    """An HF_HOME whose hub cache holds a tiny model as a download leaves it:
    hub/models--ORG--NAME/snapshots/<commit>/ (the files) and refs/main (the commit)."""
    home = tmp_path_factory.mktemp("hf_home")
    repo, commit = home / "hub" / f"models--{HUB_MODEL.replace('/', '--')}", "0" * 39 + "1"
    tiny_policy(tokenizer).save_pretrained(repo / "snapshots" / commit)
    tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return home


def standard_rows(n):
    return [{"prompt": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"],
             "rejected": r["rejected"][0]["content"]} for r in make_rows(n)]


def hub_dataset(folder, rows):
    """A folder laid out as a dataset repository on the hub: one parquet file per split under data/."""
    import datasets
    (folder / "data").mkdir(parents=True)
    for split, part in (("train", rows[:24]), ("test", rows[24:])):
        datasets.Dataset.from_list(part).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return str(folder)


SCRIPTS_IN_ONE_PROCESS = """
import contextlib, json, sys
import eval as judge, train
for argv, log in json.loads(sys.argv[1]):
    sys.argv = argv
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            (train.main if argv[0] == "train.py" else judge.main)()
        except SystemExit as e:
            if e.code:
                raise
"""


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory, hub_home):
    """`--model ORG/NAME --data ...` as a GPU recipe runs it, with the download replaced by a filled cache: train.py
    on a standard and a conversational hub dataset, eval.py on the standard run. The three commands run one after
    the other in one new process (HF_HOME is read when the libraries are imported), each with its own log."""
    root, plan, runs = tmp_path_factory.mktemp("hub"), [], {}
    for kind in ("standard", "conversational"):
        data = hub_dataset(root / kind / "dataset", make_rows(32) if kind == "conversational" else standard_rows(32))
        out = root / kind / "run"
        plan.append((["train.py", "--model", HUB_MODEL, "--data", data, "--train_split", "train", "--eval_split",
                      "test", "--max_steps", "2", "--batch_size", "4", "--disc_dim", "32", "--disc_heads", "2",
                      "--max_length", "64", "--max_prompt_length", "40", "--dtype", "fp32", "--output_dir", str(out)],
                     str(root / kind / "train.log")))
        runs[kind] = out
    plan.append((["eval.py", str(runs["standard"]), "--split", "test", "--limit", "8", "--gen_prompts", "2",
                  "--samples", "1", "--temperatures", "1.0", "--max_new_tokens", "4"], str(root / "eval.log")))
    done = subprocess.run([sys.executable, "-c", SCRIPTS_IN_ONE_PROCESS, json.dumps(plan)], capture_output=True,
                          text=True, env={**TEST_ENV, "HF_HOME": str(hub_home)}, cwd=HERE, timeout=300)
    logs = {path: open(path).read() if os.path.exists(path) else "" for _, path in plan}
    assert done.returncode == 0, (done.stderr[-2000:], {p: text[-1000:] for p, text in logs.items()})
    return {kind: (out, logs[str(root / kind / "train.log")]) for kind, out in runs.items()}


@pytest.mark.slow  # a process of its own
@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_a_hub_model_id_and_a_hub_dataset_train_and_evaluate_offline_through_the_libraries_loaders(hub_runs, kind):
    """eval.py runs on the standard run (the conversational one differs only in tokenisation, which train.py covers)."""
    out, printed = hub_runs[kind]
    assert "train [train]: 24 pairs" in printed and "eval [test]: 8 pairs" in printed
    assert "eval test step 2 | loss" in printed
    # the name resolved to the cached snapshot (nothing else offline could): the saved policy is the tiny model
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    if kind == "conversational":
        return
    test = json.loads((out / "eval.json").read_text())["results"][0]["splits"]["test"]
    assert test["pairs"] == 8 and 0 <= test["rewards/accuracies"] <= 1 and "1.0" in test["generation"]


# ------------------------------------ train.py on several processes (torchrun, gloo, CPU): slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # 1 thread each


DIST_FLAGS = [*TINY_FLAGS, "--max_steps", "4", "--eval_every", "2", "--eval_pairs", "3", "--save_every", "100",
              "--lr", "1e-3"]


def max_abs_diff(a, b, skip=()):
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if k not in skip)


def train_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


TWO_PROCESS_FLAGS = {"authors": [], "no_dropout": ["--disc_dropout", "0"],  # GANPO; DPO below
                     "dpo": ["--adv_weight", "0", "--grad_accum", "2", "--gradient_checkpointing"]}


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory, data_file):
    """train.py runs on 2 processes, one after the other in one torchrun launch (this file's
    __main__ runs them; a launch costs ~9 s of starting processes): GANPO with the authors' flags
    (discriminator dropout on), GANPO without dropout, DPO with gradient accumulation and
    checkpointing; then the authors' flags again, stopped by a SIGTERM that only rank 0 gets while
    step 1 runs, and resumed. -> {name: (output folder, its flags)}, "printed": rank 0's output."""
    root = tmp_path_factory.mktemp("two_process")
    runs = {name: (root / name, [*DIST_FLAGS, "--data", data_file, *flags])
            for name, flags in TWO_PROCESS_FLAGS.items()}
    stopped = str(root / "stopped")
    plan = [{"flags": [*flags, "--output_dir", str(out)]} for out, flags in runs.values()]
    plan += [{"flags": [*runs["authors"][1], "--output_dir", stopped], "sigterm_during_step": 1},
             {"flags": ["--output_dir", stopped, "--resume"]}]
    r = subprocess.run([*TORCHRUN, os.path.abspath(__file__), json.dumps(plan)], capture_output=True,
                       text=True, env=TEST_ENV, cwd=HERE, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return {**runs, "stopped": (root / "stopped", None), "printed": r.stdout}


@pytest.mark.slow
def test_dpo_on_two_processes_equals_one_process_on_the_same_global_batch(tmp_path, two_process_runs):
    two, flags = two_process_runs["dpo"]
    one = tmp_path / "one"
    assert train_here([*flags, "--output_dir", str(one)])[0] == 0
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    initial = loading.load_policy("tiny", loading.load_tokenizer("tiny"), 0).state_dict()
    assert max_abs_diff(a, {k: initial[k] for k in a}) > 1e-3  # it trained
    assert max_abs_diff(a, b) < 1e-5
    ra, rb = train_records(one), train_records(two)
    assert [x["step"] for x in rb] == [x["step"] for x in ra] == [0, 1, 2, 2, 3, 4]  # one line per step (+ evals)
    for x, y in zip(ra, rb):  # logged figures are over all ranks' pairs, not rank 0's share
        for k in ("loss", "rewards/margins", "logps/chosen", "tokens", "eval/opo/loss", "eval/rewards/accuracies"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), k


@pytest.mark.slow
def test_ganpo_on_two_processes_keeps_identical_replicas_and_matches_one_process_without_dropout(
        tmp_path, two_process_runs):
    # the replicas: every rank holds the same discriminators and running means (dropout on: each
    # rank draws its own masks, the averaged gradients still keep the copies identical)
    state = torch.load(two_process_runs["authors"][0] / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["replicas"]) == 2
    assert state["replicas"][0] == state["replicas"][1]
    discs = ganpo.build_discriminators(64, SMALL_D)
    discs.load_state_dict(state["discs"])
    assert state["replicas"][0] == scaleout.replica_fingerprint(discs, state["ema"])  # the hash is of these weights
    initial = {f"{s}.{k}": v for s, d in state["discs_init"].items() for k, v in d.items()}  # parameters only
    assert max_abs_diff({k: state["discs"][k] for k in initial}, initial) > 1e-4  # and they did learn
    # without dropout, 2 processes compute what 1 process computes on the same global batch
    two, flags = two_process_runs["no_dropout"]
    one = tmp_path / "one"
    assert train_here([*flags, "--output_dir", str(one)])[0] == 0
    # The policy: its updates agree to 0.1% of how far it moved. Not weight by weight: the policy meets the
    # discriminators after their step, and Adam's first step moves every weight by about ±lr whatever its
    # gradient's size, so where a gradient is rounding alone (the output bias below) the two D_1 differ by
    # ~lr, and weights of the policy that barely learn can differ by up to ~lr too.
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    start = loading.load_policy("tiny", loading.load_tokenizer("tiny"), 0).state_dict()
    apart = math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in a))
    moved = math.sqrt(sum(float((a[k] - start[k]).pow(2).sum()) for k in a))
    assert moved > 1 and apart < 1e-3 * moved
    sa, sb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (one, two))
    # The output bias is left out: the two terms of each relativistic pair pull it in opposite directions
    # and nearly cancel, so its gradient is mostly rounding, which Adam scales up to ~lr per step.
    assert max_abs_diff(sa["discs"], sb["discs"], skip=("chosen.head.2.bias", "rejected.head.2.bias")) < 1e-4
    assert sa["ema"] == pytest.approx(sb["ema"], abs=1e-4)
    for x, y in zip(train_records(one), train_records(two)):
        for k in ("loss", "gen/loss", "disc/loss", "disc/real_fake_acc", "eval/disc/auc_real_fake"):
            if k in x:
                assert y[k] == pytest.approx(x[k], abs=1e-4), k


@pytest.mark.slow
def test_two_process_run_stopped_by_sigterm_resumes_exactly_on_two_processes(two_process_runs):
    printed, out = two_process_runs["printed"], two_process_runs["stopped"][0]
    assert "SIGTERM: saved step 2" in printed and "resumed from step 2" in printed  # both ranks stopped
    assert_same_run(two_process_runs["authors"][0], out)
    code, printed = train_here(["--output_dir", str(out), "--resume"])  # 1 process: a line saying how
    assert code == 2 and "saved on 2 process(es)" in printed.strip().splitlines()[-1]
    code, printed = train_here(["--output_dir", str(out), "--resume"])  # 1 process: a line saying how
    assert code == 2 and "saved on 2 process(es)" in printed.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_run_saved_on_two_processes_loads_into_one_process_for_eval(tmp_path, two_process_runs):
    import eval as ev
    out = two_process_runs["authors"][0]
    final = train_records(out)[-1]
    held_out = str(tmp_path / "held.jsonl")  # train.py held out the file's last 10% (4 of 40 rows)
    with open(held_out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in make_rows(40)[36:])
    cfg = ev.EvalConfig(runs=[str(out)], data=held_out, split="x", gen_prompts=0, temperatures="", batch_size=4)
    res = ev.evaluate_run(str(out), cfg, None)["splits"]["x"]
    for key in ("rewards/margins", "rewards/chosen", "opo/loss", "disc/auc_real_fake", "disc/auc_fake_contrast"):
        assert res[key] == pytest.approx(final[f"eval/{key}"], rel=1e-5, abs=1e-6), key
    assert abs(res["rewards/margins"]) > 1e-4


# -------------------------------------------------------------------------------------- eval.py

def test_eval_of_an_untrained_policy_gives_zero_rewards_zero_kl_and_a_chance_probe(untrained_run, data_file):
    import eval as ev
    out = untrained_run[0]
    cfg = ev.EvalConfig(runs=[str(out)], data=data_file, split="x", limit=12, gen_prompts=2, samples=2,
                        temperatures="1.0", max_new_tokens=8)
    res = ev.evaluate_run(str(out), cfg, ev.make_scorer(""))["splits"]["x"]
    assert res["rewards/chosen"] == 0 and res["rewards/margins"] == 0
    assert res["latent/cosine"] == pytest.approx(1.0, abs=1e-6) and res["latent/mmd2"] == pytest.approx(0, abs=1e-9)
    assert res["latent/probe_accuracy"] == 0.5
    gen = res["generation"]["1.0"]
    assert gen["kl"] == pytest.approx(0, abs=1e-5) and gen["win_rate"] == 0.5  # same seed, same model: same samples


def test_probe_and_kl_detect_a_deliberately_shifted_policy(tokenizer):
    import eval as ev
    policy = tiny_policy(tokenizer)
    ref = ganpo.make_reference(policy)
    with torch.no_grad():
        policy.model.norm.weight.mul_(1.5)  # scale the final norm: latents move, logits sharpen
        policy.model.norm.weight.add_(0.3 * torch.randn_like(policy.model.norm.weight))
    batch = batch_of(tokenizer, make_rows(16))
    _, latents = ganpo.evaluate(policy, ref, [batch], ganpo.GANPOConfig(), nullcontext, latents=True)
    drift = ev.latent_drift(latents, seed=0)
    assert drift["latent/probe_accuracy"] > 0.9 and drift["latent/mmd2"] > 0.01
    cfg = ev.EvalConfig(samples=2, max_new_tokens=8)
    gen = ev.generation_metrics(policy.eval(), ref, tokenizer, [r["prompt"] for r in make_rows(3)], 1.0, cfg,
                                ev.make_scorer(""))
    assert gen["kl"] > 0.05


def test_eval_preference_metrics_equal_the_training_time_evaluation(tmp_path, trained_run, capsys):
    import eval as ev
    out = trained_run[0]
    final = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    held_out = str(tmp_path / "held.jsonl")  # train.py held out the file's last 10% (4 of 40 rows)
    with open(held_out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in make_rows(40)[36:])
    cfg = ev.EvalConfig(runs=[str(out)], data=held_out, split="x", gen_prompts=0, temperatures="", batch_size=4)
    res = ev.evaluate_run(str(out), cfg, None)["splits"]["x"]
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/chosen", "opo/loss",
                "disc/auc_real_fake", "disc/auc_fake_contrast", "disc/chosen/auc_real_fake"):
        assert res[key] == pytest.approx(final[f"eval/{key}"], rel=1e-5, abs=1e-6), key
    assert abs(res["rewards/margins"]) > 1e-4  # the run really moved
    assert "preferences, latent drift and discriminators on 4 pairs" in capsys.readouterr().out  # progress


def test_eval_table_shows_the_discriminators_view_in_rows_of_its_own(trained_run, untrained_run, data_file, capsys):
    import eval as ev
    cfg = ev.EvalConfig(data=data_file, split="x", limit=8, gen_prompts=0, temperatures="")
    results = [ev.evaluate_run(str(r[0]), cfg, None) for r in (trained_run, untrained_run)]
    ev.print_table(results)
    out = capsys.readouterr().out
    table = out[out.index("== x =="):].splitlines()
    view = table.index("discriminators' view (the trained discriminators on these pairs; 0.5 = chance)")
    assert table[view - 1].startswith("probe accuracy")  # after the independent drift measures, apart from them
    ours = results[0]["splits"]["x"]["disc/auc_real_fake"]
    assert table[view + 1].split()[-2:] == [f"{ours:.3f}", "0.500"]  # untrained: policy = reference, AUC exactly ½


PNG = b"\x89PNG\r\n\x1a\n"


def test_eval_draws_its_figure_and_the_training_curves_of_a_run(trained_run, data_file, tmp_path, monkeypatch, capsys):
    import eval as ev
    out = trained_run[0]
    cfg = ev.EvalConfig(data=data_file, split="x", limit=8, gen_prompts=1, samples=1, max_new_tokens=4, temperatures="1.0")
    ev.plot([ev.evaluate_run(str(out), cfg, ev.make_scorer(""))], str(tmp_path / "eval.png"))
    assert (tmp_path / "eval.png").read_bytes()[:8] == PNG and not (tmp_path / "eval.png.tmp").exists()
    monkeypatch.setattr(sys, "argv", ["eval.py", str(out), "--curves"])
    ev.main()  # no model is loaded: metrics.jsonl -> curves.png
    assert capsys.readouterr().out.strip().endswith(f"plot: {out / 'curves.png'}")
    assert (out / "curves.png").read_bytes()[:8] == PNG and (out / "curves.png").stat().st_size > 20000
    monkeypatch.setattr(sys, "argv", ["eval.py", str(tmp_path), "--curves"])  # a folder without metrics.jsonl
    with pytest.raises(SystemExit):
        ev.main()
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'metrics.jsonl'}: no such file (is {tmp_path} a train.py --output_dir?)"


def glossary_name(key):
    """A logged key as docs/metrics.md names it: no eval/ prefix, a discriminator's side as {side}."""
    key = key.removeprefix("eval/")
    if key.startswith(("disc/", "ema/")):
        key = key.replace("/chosen/", "/{side}/").replace("/rejected/", "/{side}/")
    return key


def test_every_key_a_run_and_eval_py_write_is_in_the_metric_glossary(trained_run, data_file, tokenizer):
    """GANPO's records (trained_run) hold every key DPO's and the controls' do (latent/mmd, nll/chosen are
    logged on every run): checked on a DPO step with both controls on. eval.json's keys from one evaluation."""
    import eval as ev
    out = trained_run[0]
    keys = {k for line in (out / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    policy, ref, _, popt, _ = setup_models(tokenizer, adv_weight=0)
    dpo = ganpo.ganpo_step(policy, ref, None, popt, None, [batch_of(tokenizer, make_rows(4))],
                           ganpo.GANPOConfig(adv_weight=0, latent_reg="mmd", rpo_alpha=1.0), {}, nullcontext)
    assert set(dpo) <= keys  # nothing a DPO step logs is missing from GANPO's record
    cfg = ev.EvalConfig(data=data_file, split="x", limit=8, gen_prompts=1, samples=1, max_new_tokens=4,
                        temperatures="1.0")
    split = ev.evaluate_run(str(out), cfg, ev.make_scorer(""))["splits"]["x"]
    keys |= set(split) | set(split["generation"]["1.0"])
    with open(os.path.join(HERE, "docs", "metrics.md"), encoding="utf-8") as f:
        glossary = f.read()
    missing = sorted({glossary_name(k) for k in keys if f"`{glossary_name(k)}`" not in glossary})
    assert len(keys) > 60 and not missing, missing


def test_generation_is_reproducible_for_a_fixed_seed(tokenizer):
    import eval as ev
    policy = tiny_policy(tokenizer).eval()
    prompts = [r["prompt"] for r in make_rows(2)]
    a = ev.sample(policy, tokenizer, prompts, 1.0, 2, 8, seed=3)
    b = ev.sample(policy, tokenizer, prompts, 1.0, 2, 8, seed=3)
    c = ev.sample(policy, tokenizer, prompts, 1.0, 2, 8, seed=4)
    assert a == b and a != c


# ------------------------------------------------------------------------------------- bench.py

@pytest.mark.parametrize("checkpointing, k", [(False, 1), (True, 1), (False, 2)])
def test_step_flops_formula_matches_the_flops_torch_counts(tokenizer, checkpointing, k):
    """bench.py predicts the GANPO/DPO ratio for large models from step_flops(); it must match what
    torch's FLOP counter sees in a real step, with and without gradient checkpointing, in one
    micro-batch or two (where GANPO runs the policy's forward again, DPO does not)."""
    import bench
    from torch.utils.flop_counter import FlopCounterMode
    policy, ref, discs, popt, dopt = setup_models(tokenizer)
    if checkpointing:
        scaleout.enable_checkpointing(policy)
    policy.train()
    P, T, pairs = 8, 40, 2
    g = torch.Generator().manual_seed(0)
    ex = [{k: torch.randint(0, 1000, (n,), generator=g).tolist() for k, n in
           (("prompt", P), ("chosen", T - P), ("rejected", T - P))} for _ in range(pairs)]
    micro = [loading.collate(ex[i:i + pairs // k], tokenizer.pad_token_id) for i in range(0, pairs, pairs // k)]
    counted = {}
    for arm, d, opt in (("dpo", None, None), ("ganpo", discs, dopt)):
        with FlopCounterMode(display=False) as counter:
            ganpo.ganpo_step(policy, ref, d, popt, opt, micro, ganpo.GANPOConfig(adv_weight=1.0 if d else 0.0), {},
                             nullcontext)
        counted[arm] = counter.get_total_flops()
    dpo, extra = bench.step_flops(bench.shape_of(policy.config), pairs, T, P, 32, 2, "all", checkpointing, k)
    norms = sum(p.numel() for n, p in policy.named_parameters() if "norm" in n)  # the only weights n_params leaves out
    assert bench.n_params(bench.shape_of(policy.config), tied=True) + norms == sum(p.numel() for p in policy.parameters())
    assert dpo == pytest.approx(counted["dpo"], rel=0.03)
    assert dpo + extra == pytest.approx(counted["ganpo"], rel=0.03)


def test_fsdp_memory_estimate_shards_the_state_and_keeps_gathered_layers_whole():
    import bench
    shape, tokens = (2, 4, 4, 2, 8, 10), 3  # layers, d, q, kv, ffn, vocab
    per_layer, root = 2 * 4 * 4 + 2 * 4 * 2 + 3 * 4 * 8, 10 * 4  # 144, tied embeddings: 40
    assert bench.n_params(shape, True) == root + 2 * per_layer
    one = bench.memory_estimate(shape, True, tokens)
    for gpus in (1, 4):  # by hand: 20 B/param sharded, 8 B/param for the root and two layers gathered
        expected = one - 20 * (root + 2 * per_layer) + 20 * (root + 2 * per_layer) / gpus + 8 * (root + 2 * per_layer)
        assert bench.fsdp_memory_estimate(shape, True, tokens, gpus) == pytest.approx(expected)
    big = bench.FIT_MODELS["Llama-3.1-8B"]
    per_gpu = [bench.fsdp_memory_estimate(*big, 8192, n) / 2 ** 30 for n in (1, 4, 8)]
    assert per_gpu[0] > 80 > per_gpu[1] > per_gpu[2]  # 8B: not on one 80 GB GPU, on 4 or 8 with FSDP


def test_lora_memory_estimate_counts_the_adapters_peft_builds_and_drops_the_reference(tokenizer):
    import bench
    policy = lora_policy(tokenizer, r=4)
    shape = bench.shape_of(policy.config)
    assert bench.lora_params(shape, 4) == sum(p.numel() for p in policy.parameters() if p.requires_grad)
    tokens, P, A = 3, bench.n_params(shape, True), bench.lora_params(shape, 4)
    full = bench.memory_estimate(shape, True, tokens)  # 20 B/param: weights, grads, AdamW, the reference copy
    assert bench.lora_memory_estimate(shape, True, tokens, 4) == full - 20 * P + 2 * P + 16 * A


@pytest.mark.slow
def test_bench_reports_times_memory_and_flop_ratios(tmp_path):
    import bench  # its main() here; the two peak-memory children are processes of their own
    code, out, err = main_here(bench.main, ["bench.py", "--model", "tiny", "--batch_size", "2", "--max_length",
                                            "32", "--steps", "2", "--disc_dim", "32", "--disc_heads", "2",
                                            "--dtype", "fp32", "--json"])
    assert code == 0, err[-2000:]
    r = json.loads(out.strip().splitlines()[-1])
    assert len(r["all_seconds"]["dpo"]) == len(r["all_seconds"]["ganpo"]) == 2
    assert r["time_ratio"] == pytest.approx(r["seconds"]["ganpo"] / r["seconds"]["dpo"])
    assert r["flops"]["ganpo"] > r["flops"]["dpo"] > 0
    assert r["flop_ratio_formula"] == pytest.approx(r["flop_ratio_counted"], rel=0.03)
    assert r["peak_bytes"]["dpo"] > 10 * 2 ** 20 and r["peak_bytes"]["ganpo"] > 10 * 2 ** 20
    predicted = list(r["predicted_ratio"].values())  # 0.5B, 1.7B, 8B: the overhead shrinks as models grow
    assert predicted == sorted(predicted, reverse=True) and predicted[-1] < 1.01
    assert "GANPO/DPO: time" in out
    rate = r["matmul_flops_per_s"]  # efficiency = achieved FLOP/s over a plain matmul's FLOP/s here
    for arm in ("dpo", "ganpo"):
        assert r["efficiency"][arm] == pytest.approx(r["flops"][arm] / r["seconds"][arm] / rate)
    extra = (r["flops"]["ganpo"] - r["flops"]["dpo"]) / (r["seconds"]["ganpo"] - r["seconds"]["dpo"]) / rate
    assert r["efficiency"]["extra"] == pytest.approx(extra)


# --------------------------------------------------------------------------- experiments/run.py

def script_module(*path):
    """A script of the repository (not a package module) imported from its file."""
    spec = importlib.util.spec_from_file_location(path[-1][:-3], os.path.join(HERE, *path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grid_module():
    return script_module("experiments", "run.py")


def test_report_pools_each_methods_difference_from_dpo_over_seeds_with_its_standard_error():
    def cell(method, seed, acc, reward, reward_se, mmd2, noise=0.0):
        return {"method": method, "noise": noise, "seed": seed,
                "final_eval": {"test": {"rewards/accuracies": acc, "pairs": 100}},
                "eval": {"test": {"latent/mmd2": mmd2,
                                  "generation": {"1.0": {"reward": reward, "reward_se": reward_se}}}}}
    done = [cell("dpo", 0, 0.7, 0.8, 0.03, 0.10), cell("dpo", 1, 0.6, 0.7, 0.04, 0.20),
            cell("ganpo", 0, 0.8, 0.9, 0.03, 0.15), cell("ganpo", 1, 0.8, 0.6, None, 0.10),
            cell("ganpo-frozen", 0, 0.72, 0.84, 0.02, 0.30), cell("ganpo", 0, 0.9, 0.9, 0.1, 0.1, noise=0.2)]
    rows = [line for line in grid_module().against_dpo(done) if line.startswith("| ganpo")]
    # accuracy: Δ 0.1 and 0.2; binomial SEs over 100 pairs of the four cells, the mean's SE halves their root sum
    se = math.sqrt(0.7 * 0.3 / 100 + 0.8 * 0.2 / 100 + 0.6 * 0.4 / 100 + 0.8 * 0.2 / 100) / 2
    assert abs(se - 0.0439) < 1e-4 and 0.15 > 2 * se
    # reward: Δ 0.1 and −0.1, one record without its SE: the mean, no SE, no star
    assert rows[0] == f"| ganpo − dpo | 0 | 0, 1 | +0.050 / -0.100 | 0.150 ± {se:.3f}* | 0.000 |"
    se = math.sqrt(0.7 * 0.3 / 100 + 0.72 * 0.28 / 100)  # one seed: Δ 0.02 within its SE, Δ reward 0.04 ± 0.036
    assert rows[1] == f"| ganpo-frozen − dpo | 0 | 0 | +0.200 | 0.020 ± {se:.3f} | 0.040 ± 0.036 |"
    assert len(rows) == 2  # no DPO cell at noise 0.2: no row


def test_report_correlates_reward_with_each_distance_from_the_reference_over_the_cells():
    def cell(method, seed, reward, kl, mmd2, noise=0.0):
        return {"method": method, "noise": noise, "seed": seed,
                "eval": {"test": {"latent/mmd2": mmd2, "generation": {"1.0": {"reward": reward, "kl": kl}}}}}
    done = [cell("dpo", 0, 0.8, 14.0, 0.13), cell("ganpo", 0, 0.9, 16.0, 0.22),
            cell("dpo-mmd10", 0, 0.6, 7.0, 0.00), cell("dpo-rpo1", 0, 0.7, 7.0, 0.06),
            cell("dpo-mmd30", 0, 0.1, 1.0, 0.0),  # not in the comparison: left out
            cell("dpo", 0, 0.8, 14.0, 0.1, noise=0.2), cell("ganpo", 0, 0.9, 16.0, 0.2, noise=0.2)]
    rows = [line for line in grid_module().what_reward_follows(done) if line.startswith("| 0")]
    reward, kl, mmd2 = [0.8, 0.9, 0.6, 0.7], [14.0, 16.0, 7.0, 7.0], [0.13, 0.22, 0.0, 0.06]

    def pearson(x, y):  # by hand
        mx, my = sum(x) / len(x), sum(y) / len(y)
        sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
        return sxy / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert abs(pearson(reward, kl) - 0.9358) < 1e-4 and abs(pearson(reward, mmd2) - 0.9957) < 1e-4
    # noise 0.2 has two cells: no row
    assert rows == [f"| 0 | 4 | 1.0 | {pearson(reward, kl):.2f} | {pearson(reward, mmd2):.2f} |"]


@pytest.mark.slow
def test_experiment_grid_records_a_cell_skips_it_when_rerun_reproduces_it_and_reports_it(tmp_path, monkeypatch):
    """experiments/run.py's main() in this process; each cell's train.py and eval.py are processes."""
    grid_script = grid_module()
    grid = ["experiments/run.py", "--methods", "dpo", "--noise", "0.2",
            "--seeds", "0", "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"),
            "--train_flags", "--model tiny --max_steps 1 --batch_size 2 --max_length 48 --max_prompt_length 40",
            "--eval_flags", "--limit 4 --gen_prompts 1 --samples 1 --temperatures 1.0 --max_new_tokens 4"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # for the cells' processes

    def run(*flags):
        code, out, err = main_here(grid_script.main, [*grid, *flags])
        return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)
    # the same cell, run again into another folder by `python experiments/run.py`, beside this one
    check = subprocess.Popen([sys.executable, *grid, "--results", str(tmp_path / "check"), "--runs",
                              str(tmp_path / "runs-check")], cwd=HERE, env=TEST_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = run()
    assert first.returncode == 0, first.stderr[-2000:]
    path = tmp_path / "results" / "dpo-n0.2-s0.json"
    r = json.loads(path.read_text())
    assert r["train_config"]["adv_weight"] == 0 and r["train_config"]["label_noise"] == 0.2
    assert set(r["eval"]) == {"test", "shift"} and r["eval"]["test"]["pairs"] == 4
    assert len(r["metrics"]) == 1 and r["train_wall_s"] > 0 and r["peak_memory_gib"] > 0
    assert not (tmp_path / "runs" / "dpo-n0.2-s0").exists()  # weights deleted once recorded
    # paths in a record are the repository's, so any clone can rerun it
    assert str(tmp_path) not in path.read_text() and HERE not in path.read_text()
    assert r["train_command"].startswith("python train.py --output_dir runs/grid/dpo-n0.2-s0 --eval_every 8 ")
    assert r["eval_command"].startswith("python eval.py runs/grid/dpo-n0.2-s0 --split test,shift ")
    again = run()
    assert again.returncode == 0 and "training" not in again.stdout  # a finished cell is not rerun
    # the same cell run again into another folder reproduces every figure; a changed figure is named
    assert check.wait(timeout=300) == 0, check.stdout.read()[-2000:]
    cmp = run("--compare", str(tmp_path / "check"))
    assert cmp.returncode == 0 and "dpo-n0.2-s0: every figure equal" in cmp.stdout, cmp.stdout + cmp.stderr
    changed = json.loads((tmp_path / "check" / "dpo-n0.2-s0.json").read_text())
    changed["eval"]["shift"]["latent/mmd2"] += 1e-6
    changed["eval"]["test"]["opo/loss"] *= 1.5  # relative difference 1/3: listed first
    (tmp_path / "check" / "dpo-n0.2-s0.json").write_text(json.dumps(changed))
    cmp = run("--compare", str(tmp_path / "check"))
    assert cmp.returncode == 1 and "2 figures differ, the largest relative difference 3.3e-01 first" in cmp.stdout
    assert cmp.stdout.index("/eval/test/opo/loss") < cmp.stdout.index("/eval/shift/latent/mmd2")
    assert "1 of 1 cells" in cmp.stderr
    (tmp_path / "check" / "dpo-n0.2-s0.json").write_text("{ cut short")
    cmp = run("--compare", str(tmp_path / "check"))
    assert cmp.returncode == 1 and cmp.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'check' / 'dpo-n0.2-s0.json'}: not a cell record (Expecting property name enclosed in "
        "double quotes: line 1 column 3 (char 2))"]
    rep = run("--report")
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "| dpo | 0.2 | test | 1 |" in (tmp_path / "results.md").read_text()
    # paired differences: a made-up GANPO cell of the same seed, 0.1 more accurate on test, 1.5x the step time
    g = {**r, "method": "ganpo", "name": "ganpo-n0.2-s0", "step_time_median_s": 1.5 * r["step_time_median_s"]}
    g["eval"] = json.loads(json.dumps(r["eval"]))
    g["eval"]["test"]["rewards/accuracies"] += 0.1
    (tmp_path / "results" / "ganpo-n0.2-s0.json").write_text(json.dumps(g))
    rep = run("--report")
    assert rep.returncode == 0, rep.stderr[-2000:]
    text = (tmp_path / "results.md").read_text()
    p_dpo, p_gan = r["eval"]["test"]["rewards/accuracies"], g["eval"]["test"]["rewards/accuracies"]
    se = math.sqrt(p_dpo * (1 - p_dpo) / 4 + p_gan * (1 - p_gan) / 4)  # 4 pairs each, taken as independent
    assert "| ganpo − dpo | 0.2 | test | 1 | 0.100 ± " + f"{se:.3f} | 0.000 ± 0.000 | 0.000 | 0.000 | 0.000 | 1.500 | 1.000 |" in text
    assert "| ganpo − dpo | 0.2 | shift | 1 | 0.000 ± " in text
    assert "| ganpo | 0.2 | test | 1 | - |" in text.split("The comparison, with")[1]  # no periodic AUC in this cell
    # seed by seed, accuracy ± its binomial standard error over the final evaluation's pairs; never run: '?'
    rows = text.split("The comparison seed by seed")[1]
    final = g["final_eval"]["test"]
    assert final["pairs"] == 32  # --model tiny: --limit 32
    acc_se = math.sqrt(final["rewards/accuracies"] * (1 - final["rewards/accuracies"]) / 32)
    mmd2 = f"{g['eval']['test']['latent/mmd2']:.3f}"
    assert f"| ganpo | 0.2 | - | {mmd2} | " in rows and f" | {final['rewards/accuracies']:.3f} ± {acc_se:.3f} | " in rows
    assert "| ganpo-dlr20x-k4 | 0.2 | ? | ? | ? | ? | ? |\n" in rows
    assert "| dpo-mmd10 | 0.2 | ? | ? | ? | ? | ? |\n| dpo-rpo1 | 0.2 | ? |" in rows  # the non-adversarial controls
    assert "| pref. acc | reward T=1.0 |\n" in rows  # one reward column per temperature the records hold
    # a cell rerun with the alternating update beside its record in results/simultaneous-grid/
    (tmp_path / "results" / "simultaneous-grid").mkdir()
    old = json.loads(json.dumps(g))
    old["eval"]["test"]["latent/mmd2"] = 0.5
    old["eval"]["test"]["generation"]["1.5"] = {"reward": 0.25}
    (tmp_path / "results" / "simultaneous-grid" / "ganpo-n0.2-s0.json").write_text(json.dumps(old))
    rep = run("--report")
    assert rep.returncode == 0, rep.stderr[-2000:]
    rows = (tmp_path / "results.md").read_text().split("Old -> new")[1]
    assert f"| ganpo-n0.2-s0 | - -> - | 0.500 -> {mmd2} | " in rows and " | 0.250 -> - |" in rows
    acc = f"{final['rewards/accuracies']:.3f} ± {acc_se:.3f}"  # both sides carry their standard error
    assert f" | {acc} -> {acc} | " in rows
    # the controls' sweep: made-up noise-0 cells, DPO and DPO + 30·MMD², the term as trained beside the loss
    for method, cfg in (("dpo", {}), ("dpo-mmd30", {"latent_reg": "mmd", "latent_weight": 30.0})):
        c = {**r, "method": method, "noise": 0.0, "name": f"{method}-n0-s0",
             "train_config": {**r["train_config"], **cfg}, "metrics": [{**r["metrics"][0], "latent/mmd": 0.01}]}
        (tmp_path / "results" / f"{method}-n0-s0.json").write_text(json.dumps(c))
    rep = run("--report")
    assert rep.returncode == 0, rep.stderr[-2000:]
    rows = (tmp_path / "results.md").read_text().split("controls' sweep")[1]
    dpo_loss, mmd2 = f"{r['metrics'][0]['opo/loss']:.3f}", f"{r['eval']['test']['latent/mmd2']:.3f}"
    assert f"| dpo | {dpo_loss} | 0.000 | {mmd2} | " in rows and f"| dpo-mmd30 | {dpo_loss} | 0.300 | " in rows
    assert "| pref. acc | reward T=1.0 |\n" in rows  # one reward column per temperature the records hold
    for figure in ("results.png", "game.png", "comparison.png"):  # matplotlib is a requirement: the report always draws
        assert (tmp_path / figure).read_bytes()[:8] == PNG, figure


if __name__ == "__main__":  # torchrun ... test_ganpo.py PLAN: the train.py runs of two_process_runs
    for run in json.loads(sys.argv[1]):
        stop = run.get("sigterm_during_step") if os.environ["RANK"] == "0" else None
        code, printed = train_here(run["flags"], stop_during_step=stop, signum=signal.SIGTERM)
        print(printed, flush=True)
        assert code == 0, printed[-3000:]
        torch.distributed.barrier()  # rank 0 has written the run's files before any rank goes on
    torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------- scripts/gpu_check.py

def compare_authors():
    return script_module("scripts", "compare_authors.py")


def test_compare_authors_loads_a_discriminator_saved_under_the_authors_names_into_ours_unchanged():
    """The authors' TransformerDiscriminator keeps the legacy hook's weight_orig/_u/_v and its own names
    (project_in, pos_embedding (1, L, d), transformer); rename ours (legacy) to those, map back, compare."""
    torch.manual_seed(0)
    legacy = ganpo.Discriminator(48, 32, n_heads=2, dropout=0.0, sn="legacy").eval()
    theirs = {k.replace("proj.", "project_in.").replace("encoder.", "transformer."): v
              for k, v in legacy.state_dict().items()}
    theirs["pos_embedding"] = theirs.pop("pos")[None]
    ours = ganpo.Discriminator(48, 32, n_heads=2, dropout=0.0).eval()
    ours.load_state_dict(compare_authors().our_discriminator_state(theirs))  # strict: every name found
    h, mask = torch.randn(3, 7, 48), torch.ones(3, 7, dtype=torch.bool)
    torch.testing.assert_close(ours(h, mask), legacy(h, mask), rtol=1e-5, atol=1e-6)  # same W, u, v: same σ


@pytest.mark.parametrize("sn", ["torch", "legacy"])
def test_compare_authors_starts_each_power_iteration_at_the_exact_top_singular_vectors(sn):
    torch.manual_seed(0)
    d = ganpo.Discriminator(96, 128, n_heads=4, sn=sn)
    assert sn == "torch" or sigma_estimate(d.proj, 96) < 0.8  # the legacy start is far off before
    compare_authors().exact_power_iteration_start(d)
    d.eval()
    for layer, d_in in ((d.proj, 96), (d.head[0], 128), (d.head[2], 128)):
        layer(torch.zeros(1, d_in))  # eval mode: the stored u, v, no iteration
        assert torch.linalg.matrix_norm(layer.weight.detach(), 2).item() == pytest.approx(1.0, abs=1e-5)
    assert sigma_estimate(d.proj, 96) == pytest.approx(1.0, abs=1e-5)  # and one train-mode iteration keeps it


def test_compare_authors_turns_a_trl_batch_into_ours_and_reports_relative_differences():
    c = compare_authors()
    trl_batch = {"prompt_input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]),  # TRL pads prompts on the left
                 "prompt_attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
                 "chosen_input_ids": torch.tensor([[10, 11], [12, 0]]), "chosen_attention_mask": torch.tensor([[1, 1], [1, 0]]),
                 "rejected_input_ids": torch.tensor([[13, 0], [14, 15]]),
                 "rejected_attention_mask": torch.tensor([[1, 0], [1, 1]])}
    b = c.our_batch(trl_batch, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 10, 11, 0], [7, 8, 9, 12, 0], [5, 6, 13, 0, 0], [7, 8, 9, 14, 15]]
    assert b["completion_mask"].sum(-1).tolist() == [2, 1, 1, 2] and b["attention_mask"].sum(-1).tolist() == [4, 4, 3, 5]
    assert c.relative_difference(1.5, 2.0) == 0.25 and c.relative_difference(0.0, 0.0) == 0.0
    assert c.relative_difference([torch.tensor([3.0, 0.0])], [torch.tensor([0.0, 4.0])]) == pytest.approx(5 / 4)
    lines = c.table([("step 1: DPO loss", 0.5, 0.25, 1.0)]).splitlines()
    assert lines[0].split() == ["quantity", "ours", "theirs", "rel.", "diff"]
    assert lines[1].split()[-3:] == ["0.5", "0.25", "1.0e+00"]


def gpu_check():
    return script_module("scripts", "gpu_check.py")


def test_gpu_check_without_a_cuda_device_stops_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        gpu_check().main(["--out", str(tmp_path / "r.json")])
    assert str(stop.value).startswith("error: no CUDA device") and "\n" not in str(stop.value)
    assert not (tmp_path / "r.json").exists()


def test_gpu_check_train_judge_fails_a_run_whose_step_0_is_not_dpo_or_whose_loss_does_not_fall(tmp_path):
    judge = gpu_check().judge_train

    def judged(step0_loss, reward, final_loss):
        rows = [{"step": 0, "opo/loss": step0_loss, "rewards/chosen": reward, "rewards/rejected": 0.0},
                {"step": 1, "opo/loss": 0.6}, {"step": 2, "split": "held-out", "eval/opo/loss": final_loss}]
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return judge("", str(tmp_path))
    figures, problems = judged(math.log(2), 0.0, 0.6)
    assert problems == [] and figures["steps"] == 2 and figures["final_heldout_loss"] == 0.6
    assert "step 0" in judged(0.69, 0.0, 0.6)[1][0] and "step 0" in judged(math.log(2), 1e-3, 0.6)[1][0]
    assert "did not fall" in judged(math.log(2), 0.0, 0.7)[1][0]


@pytest.mark.slow
def test_gpu_check_runs_every_check_on_the_cpu_and_writes_its_record(tmp_path, capsys, monkeypatch):
    """The same checks, on the tiny model in float32 (--allow_cpu: how CPU machines test it). Each check's script
    runs its main() in this process, as the grid test does: torchrun's with one process is train.py with
    WORLD_SIZE 1 (scaleout.start_distributed), so here its command line is parsed by torchrun's own parser and
    train.py runs without the launcher; torchrun itself, on two processes, is two_process_runs' test."""
    import bench
    from torch.distributed.run import get_args_parser
    script, launched = gpu_check(), []

    def run(cmd, timeout):
        if cmd[1:3] == ["-m", "torch.distributed.run"]:
            launch = get_args_parser().parse_args(cmd[3:])
            assert launch.standalone and launch.nproc_per_node == "1", cmd
            launched.append(launch.training_script)
            cmd = [cmd[0], launch.training_script, *launch.training_script_args]
        main = {"bench.py": bench.main, "train.py": train.main}[cmd[1]]
        t0 = time.time()
        code, out, err = main_here(main, cmd[1:])
        return code, out + err, time.time() - t0
    monkeypatch.setattr(script, "run", run)
    out = tmp_path / "record.json"
    code = script.main(["--allow_cpu", "--model", "tiny", "--dtype", "fp32", "--train_steps", "6",
                             "--train_flags", "--lr 1e-3", "--bench_flags", "--max_length 64 --steps 1 --no_memory",
                             "--out", str(out)])
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert code == 0 and record["ok"], printed
    assert [r["check"] for r in record["checks"]] == ["bench", "train", "torchrun", "lora"]
    train_row = record["checks"][1]["figures"]
    assert train_row["step0_loss"] == pytest.approx(math.log(2), abs=1e-6) and train_row["step0_rewards"] == [0, 0]
    assert train_row["final_heldout_loss"] < math.log(2) and train_row["steps"] == 6
    assert record["checks"][0]["figures"]["time_ratio"] > 1 and "all checks passed" in printed
    assert launched == ["train.py"]


# -------------------------------------------------------------- the teaching kit

def test_the_walkthrough_runs_top_to_bottom_its_assertions_hold_and_it_draws_its_figure(
        tmp_path, monkeypatch, capsys):
    """Its cells assert every figure they print (by hand against ganpo.py, the written-out step
    against ganpo_step bit for bit, the toy game's three regimes); here it runs as a script."""
    monkeypatch.setenv("WALKTHROUGH_FIGURE", str(tmp_path / "game.png"))
    runpy.run_path(os.path.join(HERE, "walkthrough.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "written out vs ganpo_step: 0;" in out
    assert (tmp_path / "game.png").stat().st_size > 20_000


def exercises_page():
    with open(os.path.join(HERE, "docs", "exercises.md"), encoding="utf-8") as f:
        return f.read()


def exercise(n):
    """Section n of docs/exercises.md, its answer included."""
    text = exercises_page()
    start = text.index(f"\n## {n}. ")
    end = text.find("\n## ", start + 1)
    return " ".join(text[start:end if end > 0 else len(text)].split())  # line breaks as spaces


def record(name):
    with open(os.path.join(HERE, "experiments", "results", f"{name}.json")) as f:
        return json.load(f)


def changed(function, old, new):
    """`function` of ganpo.py with the line edit an exercise asks for, applied to its source text
    (the edit must apply: an exercise whose line no longer exists fails here)."""
    import inspect
    import textwrap
    source = textwrap.dedent(inspect.getsource(function))
    assert old in source, f"{function.__name__} no longer has the line the exercise changes"
    namespace = dict(vars(ganpo))
    exec(source.replace(old, new), namespace)
    return namespace[function.__name__]


def walkthrough_toy_game():
    """The walkthrough's toy_game, taken from its cell (running the whole file takes ~15 s)."""
    text = open(os.path.join(HERE, "walkthrough.py"), encoding="utf-8").read()
    cell = text[text.index("def toy_game"):text.index("regimes = {")]
    namespace = {"ganpo": ganpo, "torch": torch, "nullcontext": nullcontext}
    exec(cell, namespace)
    return namespace["toy_game"]


EXERCISE_RUN = ["--model", "tiny", "--max_steps", "1", "--dtype", "fp32", "--eval_every", "0", "--limit", "8"]


@pytest.fixture(scope="session")
def exercise_runs(tmp_path_factory):
    """The exercises' tiny run as they give it, and with --disc_dropout 0 -> their step-0 records."""
    first = {}
    for name, extra in (("default", []), ("no_dropout", ["--disc_dropout", "0"])):
        out = tmp_path_factory.mktemp("exercise") / name
        code, printed = train_here([*EXERCISE_RUN, *extra, "--output_dir", str(out)])
        assert code == 0, printed[-2000:]
        with open(out / "metrics.jsonl") as f:
            first[name] = (json.loads(f.readline()), printed)
    return first


def test_exercise_1_the_step_0_loss_is_ln2_plus_a_generator_loss_near_ln2(exercise_runs):
    m, printed = exercise_runs["default"]
    text = exercise(1)
    assert "python train.py " + " ".join(EXERCISE_RUN) in exercises_page()
    assert m["opo/loss"] == pytest.approx(math.log(2), abs=4 * torch.finfo(torch.float32).eps)
    assert f"loss {m['loss']:.4f}" in printed and f"`loss {m['loss']:.4f}`" in text
    assert f"g_loss {m['gen/loss']:.3f}" in printed and f"L_G is near ln 2 as well: {m['gen/loss']:.4f}" in text
    assert 0 < abs(m["gen/loss"] - math.log(2)) < 0.01


def test_exercise_2_identical_latents_are_scored_apart_by_dropout_and_the_power_iteration(exercise_runs):
    (m, printed), (m0, _) = exercise_runs["default"], exercise_runs["no_dropout"]
    text = exercise(2)
    rf, ct = m["disc/real_fake_acc"], m["disc/contrast_acc"]
    assert f"d_acc rf/ct {rf:.2f}/{ct:.2f}" in printed and f"`d_acc rf/ct {rf:.2f}/{ct:.2f}`" in text
    assert rf != 0.5
    assert f"real/fake loss {m['disc/real_fake_loss']:.3f}" in text
    assert abs(m["disc/real_fake_loss"] - math.log(2)) > 3e-3  # a dropout sample away
    assert abs(m0["disc/real_fake_loss"] - math.log(2)) < 1e-3 and f"({m0['disc/real_fake_loss']:.4f})" in text
    assert m0["disc/real_fake_acc"] != 0.5  # the power iteration alone: rounding-sized differences
    # that it is the power iteration: in eval mode (no iteration, no dropout) the scores are equal
    torch.manual_seed(0)
    disc = ganpo.Discriminator(8, 16, 1, 2, dropout=0.0)
    h, mask = torch.randn(4, 3, 8), torch.ones(4, 3, dtype=torch.bool)
    a, f = disc.train()(h, mask), disc(h, mask)
    assert not torch.equal(a, f)
    assert torch.equal(disc.eval()(h, mask), disc(h, mask))


def test_exercise_3_the_discriminators_loss_puts_no_gradient_into_the_policy_only_because_of_the_detach(tokenizer):
    policy = tiny_policy(tokenizer)
    ref = ganpo.make_reference(policy)
    batch = batch_of(tokenizer, make_rows(4))
    discs = ganpo.build_discriminators(policy.config.hidden_size, SMALL_D)
    norms = {}
    for detach in (True, False):
        policy.zero_grad(set_to_none=True)
        _, _, hidden = ganpo.forward_logps_and_hidden(policy, batch)
        with torch.no_grad():
            _, _, ref_hidden = ganpo.forward_logps_and_hidden(ref, batch)
        real, fake, mask = ganpo.split_latents(batch, hidden, ref_hidden, "all")
        # without the detach: D_w's latents only (two backwards would meet in one policy graph)
        fake = {k: v if k == "chosen" and not detach else v.detach() for k, v in fake.items()}
        ganpo.discriminator_backward(discs, real, fake, mask, SMALL_D, {}, 1, nullcontext)
        grads = [p.grad for p in policy.parameters() if p.grad is not None]
        norms[detach] = float(torch.norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
    assert norms[True] == 0.0 and norms[False] > 1e-3
    assert "Exactly 0" in exercise(3) and "norm above 1e-3" in exercise(3)


def test_exercise_4_the_held_out_auc_below_one_half_is_the_records(tmp_path):
    text = exercise(4)
    e = record("ganpo-n0-s0")["eval"]["test"]
    for key in ("disc/auc_real_fake", "disc/chosen/auc_real_fake", "disc/rejected/auc_real_fake"):
        assert f"{e[key]:.3f}" in text
    assert e["disc/auc_real_fake"] < 0.5
    assert f"it is {record('ganpo-frozen-n0-s0')['eval']['test']['disc/auc_real_fake']:.3f}" in text


def test_exercise_5_adams_bound_on_a_discriminators_movement_and_the_recorded_movement():
    text = exercise(5)
    cfg = record("ganpo-n0-s0")["train_config"]
    peak = cfg["lr"] * cfg["disc_lr_ratio"]
    total = sum(train.get_lr(t, cfg["max_steps"], peak, cfg["warmup_steps"]) for t in range(cfg["max_steps"]))
    assert peak == 2.5e-5 and f"Σ lr_t = {total:.1e}".replace("e-0", "e-") in text
    torch.manual_seed(0)
    d = ganpo.build_discriminators(576, ganpo.GANPOConfig())["chosen"]  # SmolLM2's width
    weights = torch.cat([p.detach().flatten() for p in d.parameters()])
    rms = float(weights.pow(2).mean().sqrt())
    assert f"{rms:.3f}" in text and f"at most about {100 * total / rms:.1f}%" in text
    for name, cue in (("ganpo-n0-s0", "record"), ("ganpo-dlr20x-n0-s0", "20 times")):
        m = record(name)["metrics"][-1]
        w, l = (100 * m[f"disc/{side}/weight_change"] for side in ("chosen", "rejected"))
        assert f"{w:.{1 if cue != 'record' else 2}f}%" in text and f"{l:.{1 if cue != 'record' else 2}f}%" in text
        assert max(w, l) / 100 < (total / rms) * (20 if cue != "record" else 1)


def test_exercise_6_adv_weight_0_gives_the_dpo_step_to_the_last_bit(tokenizer):
    batch = batch_of(tokenizer, make_rows(4))
    after = []
    for with_discs in (True, False):
        torch.manual_seed(0)
        policy = tiny_policy(tokenizer)
        ref = ganpo.make_reference(policy)
        cfg = ganpo.GANPOConfig(disc_dim=32, disc_heads=2, adv_weight=0.0)
        discs = ganpo.build_discriminators(policy.config.hidden_size, cfg) if with_discs else None
        disc_opt = torch.optim.AdamW(discs.parameters(), lr=1e-3) if with_discs else None
        start = [p.detach().clone() for p in discs.parameters()] if with_discs else None
        policy_opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        ganpo.ganpo_step(policy, ref, discs, policy_opt, disc_opt, [batch], cfg, {}, nullcontext)
        after.append(torch.cat([p.detach().flatten() for p in policy.parameters()]))
        if with_discs:  # the discriminators did learn
            assert any(not torch.equal(a, p) for a, p in zip(start, discs.parameters()))
    assert torch.equal(after[0], after[1])
    assert not torch.equal(after[0], torch.cat([p.flatten() for p in tiny_policy(tokenizer).parameters()]))
    assert "equal to the last bit" in exercise(6)


def test_exercise_7_frozen_discriminators_leave_the_latents_further_from_the_reference():
    text = exercise(7)
    mmd = {(m, s): record(f"{m}-n0-s{s}")["eval"]["test"]["latent/mmd2"] for m in ("ganpo-frozen", "dpo", "ganpo")
           for s in (0, 1)}
    for value in mmd.values():
        assert f"{value:.3f}" in text
    for s in (0, 1):
        assert mmd["ganpo-frozen", s] > max(mmd["dpo", s], mmd["ganpo", s])


def test_exercise_8_four_discriminator_steps_per_policy_step_as_recorded():
    text = exercise(8)
    k4, k1 = record("ganpo-dlr20x-k4-n0-s0"), record("ganpo-dlr20x-n0-s0")
    assert (k4["train_config"]["disc_steps"], k1["train_config"]["disc_steps"]) == (4, 1)
    for r in (k4, k1):
        for side in ("chosen", "rejected"):
            assert f"{100 * r['metrics'][-1][f'disc/{side}/weight_change']:.1f}%" in text
        assert f"AUC {r['eval']['test']['disc/auc_real_fake']:.3f}" in text or \
            f"against {r['eval']['test']['disc/auc_real_fake']:.3f}" in text
        assert f"{r['eval']['test']['latent/mmd2']:.3f}" in text
        acc = r["final_eval"]["test"]["rewards/accuracies"]
        assert f"{acc:.3f}" in text
    p = k1["final_eval"]["test"]["rewards/accuracies"]
    se = math.sqrt(p * (1 - p) / k1["final_eval"]["test"]["pairs"])
    assert f"± about {se:.3f}" in text
    assert k4["final_eval"]["test"]["rewards/accuracies"] < k1["final_eval"]["test"]["rewards/accuracies"]


def test_exercise_9_label_noise_costs_ganpo_at_least_as_much_as_dpo_in_the_records():
    text = exercise(9)
    acc = {(m, n, s): record(f"{m}-n{n}-s{s}")["final_eval"]["test"]["rewards/accuracies"]
           for m in ("dpo", "ganpo") for n in ("0", "0.2") for s in (0, 1)}
    for m in ("dpo", "ganpo"):
        for s in (0, 1):
            assert f"{acc[m, '0', s]:.3f} to {acc[m, '0.2', s]:.3f}" in text
            assert acc[m, "0.2", s] < acc[m, "0", s]
    for s in (0, 1):
        assert acc["ganpo", "0", s] - acc["ganpo", "0.2", s] > acc["dpo", "0", s] - acc["dpo", "0.2", s]


def test_exercise_10_the_saturating_generator_loss_lets_the_toy_policy_run(monkeypatch):
    text = exercise(10)
    new = "    return 0.5 * (-bce(fake_chosen - m_real_chosen, 0) - bce(fake_rejected - m_real_rejected, 0))"
    assert " ".join(new.split()) in text
    saturating = changed(ganpo.generator_loss,
                         "    return 0.5 * (bce(fake_chosen - m_real_chosen, 1) + bce(fake_rejected - m_real_rejected, 1))",
                         new)
    monkeypatch.setattr(ganpo, "generator_loss", saturating)
    with pytest.raises(AssertionError) as stop:  # as a script it stops at section 5's hand-computed L_G
        runpy.run_path(os.path.join(HERE, "walkthrough.py"), run_name="__main__")
    assert "close(l_g, by_hand)" in "".join(stop.traceback[-2].statement.lines)
    history = walkthrough_toy_game()(1e-2)
    step, distance, auc, l_g = history[-1]
    assert f"‖s‖ about {distance:.1f}" in text and f"its last value {l_g:.2f}".replace("-", "−") in text
    assert 0.85 * 7.5 < distance < 7.5 and -0.05 < l_g <= 0
    assert "ended at 0.56" in text  # the original line's end, asserted by the walkthrough's run


def test_exercise_11_dpo_without_the_reference_stops_the_walkthrough_at_section_2(monkeypatch, capsys):
    text = exercise(11)
    new = "delta = policy_chosen_logps - policy_rejected_logps"
    assert f"`{new}`" in text
    no_reference = changed(ganpo.dpo_loss, """delta = ((policy_chosen_logps - ref_chosen_logps)
             - (policy_rejected_logps - ref_rejected_logps))""", new)
    monkeypatch.setattr(ganpo, "dpo_loss", no_reference)
    with pytest.raises(AssertionError) as stop:
        runpy.run_path(os.path.join(HERE, "walkthrough.py"), run_name="__main__")
    assert "assert torch.equal(step0" in "".join(stop.traceback[-1].statement.lines)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step 0:")]
    losses = json.loads(printed[0].split("step 0:")[1].split("ln 2")[0])
    by_hand = [math.log1p(math.exp(-0.1 * 3)), math.log1p(math.exp(0.1 * 2))]
    assert losses == pytest.approx(by_hand, rel=8 * torch.finfo(torch.float32).eps)
    assert f"`[{by_hand[0]:.4f}, {by_hand[1]:.4f}]`" in text
