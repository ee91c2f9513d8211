# %% [markdown]
# # GANPO, from the paper's equations to `ganpo.py`
#
# A runnable walkthrough: each cell computes one piece of the method with the functions of
# `ganpo.py`, and checks by hand what it prints. It takes under a minute on a laptop CPU.
#
# - As a script: `python walkthrough.py` (the figure goes to `walkthrough.png`; set
#   `WALKTHROUGH_FIGURE` to put it elsewhere).
# - As a notebook: VS Code and PyCharm run the `# %%` cells as they are. In Jupyter,
#   `pip install jupytext` and open this file as a notebook. For Colab, make a notebook with
#   `jupytext --to ipynb walkthrough.py`, then in Colab put the repository's files beside it
#   (upload or clone them) and run the README's install line first: the cells import
#   `ganpo.py`, `loading.py` and `scaleout.py`, and the tiny model uses SmolLM2's tokenizer.
#
# Every number a reader is asked to believe is asserted. Comparisons between a hand computation
# and a function allow a few float32 roundings (`ulps` below), never a tolerance fitted to the
# output, and each is made on inputs where the compared quantities could differ.

# %%
import math
import os
import sys
from contextlib import nullcontext

import matplotlib
import torch

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # a script writes the figure to a file; a notebook shows it inline
import matplotlib.pyplot as plt  # noqa: E402

import ganpo
import loading

EPS = torch.finfo(torch.float32).eps


def close(a, b, ulps=16):
    """a equals b up to `ulps` float32 roundings of b's size."""
    a, b = float(a), float(b)
    assert abs(a - b) <= ulps * EPS * max(1.0, abs(b)), (a, b)


torch.manual_seed(0)

# %% [markdown]
# ## 1. The objective
#
# The paper (arXiv:2601.22083) adds a divergence between two *distributions of latents* to an
# offline preference loss:
#
#     L(θ) = L_OPO(θ) + λ · D(p_θ ‖ p_ref)
#
# L_OPO is DPO, SimPO or IPO. p_θ and p_ref are the distributions of the last-layer hidden states
# H(x, y) of the policy and of the frozen reference on the same (prompt, response) sequences.
# (The abstract and the authors' code give this form; the paper's full text is not available to
# us, so the reading of D below is ours.)
#
# Hidden states have no density we could write down: H is a deterministic function of text, and
# p_θ is only something we can sample from. A GAN replaces the divergence by a discriminator
# trained to tell samples of p_ref ("real") from samples of p_θ ("fake"). In 1-D, with
# p_ref = N(0, 1) and p_θ = N(δ, 1), a discriminator trained to its optimum has a loss of exactly
# ln 2 − JS(p_θ ‖ p_ref): a well-trained discriminator *measures* the divergence.

# %%
x = torch.linspace(-14, 14, 28001, dtype=torch.float64)
dx = float(x[1] - x[0])
delta = 1.0
p_ref = torch.exp(-x ** 2 / 2) / math.sqrt(2 * math.pi)
p_pol = torch.exp(-(x - delta) ** 2 / 2) / math.sqrt(2 * math.pi)
mix = (p_ref + p_pol) / 2
js = 0.5 * float((p_ref * torch.log(p_ref / mix)).sum() * dx
                 + (p_pol * torch.log(p_pol / mix)).sum() * dx)

w = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # D(x) = σ(w0·x + w1)
opt = torch.optim.LBFGS([w], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15)


def d_loss():  # ½·(E_ref[−log D] + E_θ[−log(1 − D)]), by quadrature
    logit = w[0] * x + w[1]
    return 0.5 * ((p_ref * -torch.nn.functional.logsigmoid(logit)).sum()
                  + (p_pol * -torch.nn.functional.logsigmoid(-logit)).sum()) * dx


def closure():
    opt.zero_grad()
    loss = d_loss()
    loss.backward()
    return loss


opt.step(closure)
trained = float(d_loss().detach())
print(f"JS = {js:.6f}   trained D's loss = {trained:.6f}   ln 2 − JS = {math.log(2) - js:.6f}")
w = w.detach()
print(f"D's logit: {float(w[0]):.4f}·x + {float(w[1]):.4f}  (log p_ref/p_θ = −δ·x + δ²/2)")
assert abs(trained - (math.log(2) - js)) < 1e-9  # quadrature and LBFGS, float64
assert abs(float(w[0]) + delta) < 1e-5 and abs(float(w[1]) - delta ** 2 / 2) < 1e-5
assert js > 0.1  # the two distributions differ: the check is not 0 = 0

# %% [markdown]
# The policy's side of the game, L_G, rewards latents that the discriminator scores as
# reference. With D at its optimum, the non-saturating L_G = E_{p_θ}[−log D] is smallest, ln 2,
# when p_θ = p_ref (Arjovsky & Bottou 2017 show it then follows KL(p_θ‖p_ref) − 2·JS). In GANPO the
# discriminator is never at its optimum: it takes one Adam step per policy step, so how well it
# measures the divergence depends on how fast it learns. Section 8 shows what that does.

# %%
at_optimum = []
for d in (0.0, 0.5, 1.0, 2.0):
    q = torch.exp(-(x - d) ** 2 / 2) / math.sqrt(2 * math.pi)
    d_star = p_ref / (p_ref + q)  # the optimal discriminator
    at_optimum.append(float((q * -torch.log(d_star)).sum() * dx))
    print(f"δ = {d}: L_G at the optimal D = {at_optimum[-1]:.4f}")
assert abs(at_optimum[0] - math.log(2)) < 1e-9  # p_θ = p_ref: D* = ½ everywhere
assert all(a + 0.01 < b for a, b in zip(at_optimum, at_optimum[1:]))  # grows with the drift

# %% [markdown]
# ## 2. DPO on a few numbers
#
# DPO compares log-probabilities of the chosen (y_w) and the rejected (y_l) response, summed over
# the response's tokens, under the policy and the reference:
#
#     Δ = (log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x)),
#     L_DPO = −log σ(β·Δ),   reward r = β·(log π_θ − log π_ref)
#
# At step 0 the policy *is* the reference: Δ = 0, both rewards are 0 and the loss is ln 2.

# %%
ref_w, ref_l = torch.tensor([-12.0, -30.0]), torch.tensor([-15.0, -28.0])  # two pairs
beta = 0.1
step0 = ganpo.dpo_loss(ref_w, ref_l, ref_w, ref_l, beta)
print("step 0:", step0.tolist(), " ln 2 =", math.log(2))
assert torch.equal(step0, torch.full((2,), math.log(2)))
moved = ganpo.dpo_loss(ref_w + 2.0, ref_l - 1.0, ref_w, ref_l, beta)  # Δ = 3 for both pairs
by_hand = math.log(1 + math.exp(-beta * 3.0))
print(f"chosen +2 nats, rejected −1: loss {float(moved[0]):.5f} (by hand {by_hand:.5f})")
close(moved[0], by_hand)

# %% [markdown]
# ## 3. The latents H
#
# `--model tiny` is a random 2-layer Llama (d_model = 64) with SmolLM2's tokenizer. A batch holds
# B pairs as 2B rows, `[chosen; rejected]`: row i and row B+i share a prompt. "Latent" means the
# last decoder layer's output *after the final norm*, for every token: (2B, T, d_model). One
# forward gives both the log-probs and the latents (`forward_logps_and_hidden`).

# %%
tokenizer = loading.load_tokenizer("tiny")
policy = loading.load_policy("tiny", tokenizer, seed=0)
ref = ganpo.make_reference(policy)
reviews = [("Great place, I loved it.", "Awful, never again."),
           ("Wonderful and friendly staff!", "Terrible service and cold food."),
           ("Excellent, would return.", "Bad."),
           ("Superb value.", "Disappointing and dirty, sadly.")]
rows = [{"prompt": [{"role": "user", "content": f"Review place number {i}."}],
         "chosen": [{"role": "assistant", "content": good}],
         "rejected": [{"role": "assistant", "content": bad}]}
        for i, (good, bad) in enumerate(reviews)]
examples, _ = loading.tokenize_rows(rows, tokenizer, max_length=64, max_prompt_length=40)
batch = loading.collate(examples, tokenizer.pad_token_id)
B = len(rows)
last_layer = []  # the last decoder layer's output, before the final RMSNorm
hook = policy.get_decoder().layers[-1].register_forward_hook(
    lambda module, args, out: last_layer.append(out[0] if isinstance(out, tuple) else out))
with torch.no_grad():
    logps, n_tokens, hidden = ganpo.forward_logps_and_hidden(policy, batch)
hook.remove()
print("input_ids", tuple(batch["input_ids"].shape), " H", tuple(hidden.shape),
      " log-probs", tuple(logps.shape), " response tokens", n_tokens.tolist())
print("row 0:", repr(tokenizer.decode(batch["input_ids"][0][batch["completion_mask"][0]])))
print("row B:", repr(tokenizer.decode(batch["input_ids"][B][batch["completion_mask"][B]])))
assert hidden.shape == (2 * B, batch["input_ids"].shape[1], policy.config.hidden_size)
assert torch.equal(n_tokens, batch["completion_mask"][:, 1:].sum(1))  # the first token has no logit
decoded = [tokenizer.decode(batch["input_ids"][i][batch["completion_mask"][i]]) for i in (0, B)]
assert decoded[0].startswith(reviews[0][0]) and decoded[1].startswith(reviews[0][1])
before_norm = last_layer[0]
with torch.no_grad():
    assert torch.equal(hidden, policy.get_decoder().norm(before_norm))
assert not torch.allclose(hidden, before_norm)  # the norm does change them

# %% [markdown]
# ## 4. Real, fake, contrast, and the two discriminators
#
# GANPO has two discriminators, one per polarity: D_w (`discs["chosen"]`) and D_l
# (`discs["rejected"]`). Each is a small transformer over the latents that pools to one logit per
# sequence. D_w plays with three sets of latents (D_l with the mirror image):
#
# | role | latents | D_w should score it |
# |---|---|---|
# | real | the reference's on the chosen rows | highest |
# | fake | the policy's on the chosen rows | in the middle |
# | contrast | the reference's on the rejected rows | lowest |
#
# `split_latents` cuts the batch into these sets, `score` runs a discriminator on them. The mask
# says which tokens the discriminators see (`--disc_tokens all`: prompt and response, the
# authors' choice).

# %%
cfg = ganpo.GANPOConfig(disc_dim=32, disc_heads=2, disc_dropout=0.0)
discs = ganpo.build_discriminators(policy.config.hidden_size, cfg)
with torch.no_grad():
    ref_logps, _, ref_hidden = ganpo.forward_logps_and_hidden(ref, batch)
real, fake, mask = ganpo.split_latents(batch, hidden, ref_hidden, cfg.disc_tokens)
print({k: tuple(v.shape) for k, v in real.items()}, "mask", tuple(mask["chosen"].shape))
with torch.no_grad():
    logits = ganpo.score(discs.eval(), "chosen", real, fake, mask)
print({k: [round(v, 3) for v in t.tolist()] for k, t in logits.items()})
assert torch.equal(real["rejected"], ref_hidden[B:]) and torch.equal(fake["chosen"], hidden[:B])
assert torch.equal(logits["chosen/real"], logits["chosen/fake"])  # step 0: π_θ = π_ref
assert not torch.allclose(logits["chosen/real"], logits["chosen/contrast"])

# %% [markdown]
# ## 5. The "quad" loss, the running means m̄, and L_G
#
# The authors' discriminator loss is relativistic: a logit is compared with the *running mean* m̄
# of another set's logits, not with a fixed threshold. With a = real, f = fake, n = contrast:
#
#     L_D = ¼·[BCE(a − m̄_f, 1) + BCE(f − m̄_a, 0) + BCE(f − m̄_n, 1) + BCE(n − m̄_f, 0)]
#
# Four terms, two relativistic pairs: (a above f) is the real/fake game; (f above n) teaches D
# what its polarity looks like. Hence "quad". Below, by hand on a few numbers.

# %%
def bce_by_hand(z, target):  # BCE with logits, one value: −log σ(z) or −log(1 − σ(z))
    return math.log1p(math.exp(-z)) if target == 1 else math.log1p(math.exp(z))


a, f, n = torch.tensor([2.0, 0.5]), torch.tensor([1.0, -0.5]), torch.tensor([-1.0, 0.0])
m_a, m_f, m_n = 1.2, 0.3, -2.0  # running means
terms = [sum(bce_by_hand(v - m_f, 1) for v in a.tolist()) / 2,
         sum(bce_by_hand(v - m_a, 0) for v in f.tolist()) / 2,
         sum(bce_by_hand(v - m_n, 1) for v in f.tolist()) / 2,
         sum(bce_by_hand(v - m_f, 0) for v in n.tolist()) / 2]
quad = ganpo.quad_disc_loss(a, f, n, m_a, m_f, m_n)
print(f"quad: {float(quad):.6f}, by hand {sum(terms) / 4:.6f}, the four terms",
      [round(t, 4) for t in terms])
close(quad, sum(terms) / 4)
close(quad, 0.5 * (ganpo.pair_loss(a, f, m_a, m_f) + ganpo.pair_loss(f, n, m_f, m_n)))
assert abs(terms[0] + terms[1] - terms[2] - terms[3]) > 0.1  # the two pairs differ

# %% [markdown]
# The running means move *before* the loss that uses them, once per micro-batch: the first batch
# sets m̄ to its mean, later ones move it by (1 − μ) towards theirs (μ = `ema_decay` = 0.9).

# %%
ema = {}
ganpo.update_ema(ema, {"chosen/real": torch.tensor([1.0, 3.0])}, decay=0.9)
first = float(ema["chosen/real"])
ganpo.update_ema(ema, {"chosen/real": torch.tensor([5.0, 7.0])}, decay=0.9)
print(f"m̄ after the first batch {first}, after the second {float(ema['chosen/real']):.4f}")
assert first == 2.0
close(ema["chosen/real"], 0.9 * 2.0 + 0.1 * 6.0)

# %% [markdown]
# The policy's loss: its latents, through both (frozen) discriminators, should score above the
# running mean of the reference's:
#
#     L_G = ½·[BCE(D_w(H_θ^w) − m̄_a^w, 1) + BCE(D_l(H_θ^l) − m̄_a^l, 1)]

# %%
f_w, f_l = torch.tensor([0.2, -0.4]), torch.tensor([1.0, 0.1])
l_g = ganpo.generator_loss(f_w, f_l, 0.5, -0.3)
by_hand = 0.5 * (sum(bce_by_hand(v - 0.5, 1) for v in f_w.tolist()) / 2
                 + sum(bce_by_hand(v + 0.3, 1) for v in f_l.tolist()) / 2)
print(f"L_G = {float(l_g):.6f}, by hand {by_hand:.6f}")
close(l_g, by_hand)

# %% [markdown]
# ## 6. One alternating step, written out
#
# `ganpo.ganpo_step` handles micro-batches, autocast, torchrun and the ablations. For one
# micro-batch without any of those, one step of GANPO is the function below: the discriminators
# learn on the latents *detached* from the policy (their loss must not move θ), step, and then the
# policy meets the *updated, frozen* discriminators (the 1-2-3 of the README's diagram).

# %%
def one_step(policy, ref, discs, policy_opt, disc_opt, batch, cfg, ema):
    # 1. both models' latents; the discriminators' gradients on them, θ detached
    logps, n_tokens, hidden = ganpo.forward_logps_and_hidden(policy, batch)
    with torch.no_grad():
        ref_logps, _, ref_hidden = ganpo.forward_logps_and_hidden(ref, batch)
    real, fake, mask = ganpo.split_latents(batch, hidden, ref_hidden, cfg.disc_tokens)
    detached = {side: h.detach() for side, h in fake.items()}
    discs.train().requires_grad_(True)
    for side in ("chosen", "rejected"):
        logits = ganpo.score(discs, side, real, detached, mask)  # real, fake, contrast
        ganpo.update_ema(ema, logits, cfg.ema_decay)  # m̄ moves before the loss uses it
        ganpo.quad_disc_loss(*logits.values(), *(ema[key] for key in logits)).backward()
    # 2. the discriminators step
    disc_opt.step()
    disc_opt.zero_grad()
    # 3. the policy meets the updated, frozen discriminators, and steps
    discs.eval().requires_grad_(False)
    l_g = ganpo.generator_loss(discs["chosen"](fake["chosen"], mask["chosen"]),
                               discs["rejected"](fake["rejected"], mask["rejected"]),
                               ema["chosen/real"], ema["rejected/real"])
    loss = ganpo.opo_loss(cfg, logps, ref_logps, n_tokens).mean() + cfg.adv_weight * l_g
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    policy_opt.step()
    policy_opt.zero_grad()


def players(update="alternating"):
    """The same starting point every time: policy, reference, discriminators, optimizers, m̄."""
    torch.manual_seed(1)
    policy = loading.load_policy("tiny", tokenizer, seed=0)
    step_cfg = ganpo.GANPOConfig(disc_dim=32, disc_heads=2, disc_dropout=0.0, update=update)
    discs = ganpo.build_discriminators(policy.config.hidden_size, step_cfg)
    return (policy, ganpo.make_reference(policy), discs,
            torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0),
            torch.optim.AdamW(discs.parameters(), lr=5e-4, weight_decay=0.0), step_cfg)


def weights(*modules):
    return torch.cat([p.detach().flatten() for m in modules for p in m.parameters()])


mine, theirs, ablation = players(), players(), players("simultaneous")
start = weights(mine[0], mine[2])  # a copy: the same for all three
one_step(*mine[:5], batch, mine[5], {})
ganpo.ganpo_step(*theirs[:5], [batch], theirs[5], {}, nullcontext, max_grad_norm=1.0)
ganpo.ganpo_step(*ablation[:5], [batch], ablation[5], {}, nullcontext, max_grad_norm=1.0)
after_mine, after_theirs, after_ablation = (weights(p[0], p[2]) for p in (mine, theirs, ablation))
print("largest difference, written out vs ganpo_step:",
      f"{float((after_mine - after_theirs).abs().max()):.3g}; moved from the start by",
      f"{float((after_mine - start).abs().max()):.3g}; the simultaneous order differs by",
      f"{float((after_ablation - after_theirs).abs().max()):.3g}")
assert torch.equal(after_mine, after_theirs)  # the same operations in the same order
assert not torch.equal(after_mine, start)
assert not torch.equal(after_ablation, after_theirs)  # the order matters

# %% [markdown]
# ## 7. The two controls: no adversary at all
#
# Does the *game* matter, or only holding the latents near the reference's? Two controls answer
# that without a discriminator. `--latent_reg mmd` adds MMD²(H_θ, H_ref), a kernel two-sample
# statistic between the mean-pooled latents: 0 when the two sets are the same, growing as they
# drift apart. `--rpo_alpha` adds the chosen responses' NLL per token (RPO), which keeps the
# chosen likelihood up without looking at latents.

# %%
same = ganpo.latent_mmd(real, real, mask)
mmds = [float(ganpo.latent_mmd(real, {s: h + shift for s, h in real.items()}, mask))
        for shift in (0.02, 0.05, 0.1)]
print(f"MMD² of identical latents {float(same):.3g}; shifted by 0.02, 0.05, 0.1: "
      f"{[round(v, 4) for v in mmds]}")
assert abs(float(same)) <= 64 * EPS  # the unbiased estimate: exactly 0 up to rounding
assert 0 < mmds[0] < mmds[1] < mmds[2]
nll = ganpo.chosen_nll(logps, n_tokens)
close(nll, -float(logps[:B].sum()) / float(n_tokens[:B].sum()))
print(f"chosen NLL per token {float(nll):.4f} (a random model: about ln(vocab) = "
      f"{math.log(len(tokenizer)):.2f})")
assert abs(float(nll) - math.log(len(tokenizer))) < 0.01 * math.log(len(tokenizer))  # near-uniform

# %% [markdown]
# ## 8. A toy game: three regimes in seconds
#
# A toy, not the method: it shows how a discriminator's learning rate decides what L_G does, with
# the real loss functions (`discriminator_backward`, `adversarial_loss`) and a real (small)
# `Discriminator`. The "latents" are Gaussian: 16 sequences of 4 tokens in 8 dimensions, the
# chosen ones around +e₀ and the rejected around −e₀. The "policy" is one learnable shift s added
# to fresh samples of its own. A constant force pushes s along e₁ (standing in for the preference
# loss, which moves the latents whether or not that is wanted); L_G pulls it back. Three
# discriminator learning rates:
#
# - slow (1e-6): it barely moves. The shift grows as if there were no L_G, and on fresh
#   samples the discriminator ranks the policy's latents *above* the reference's (AUC < 0.5):
#   L_G pushed s wherever D's random score was high, and L_G stays below ln 2: the policy
#   "fools" a discriminator that is not looking. This is what our real runs found.
# - playing (1e-2): it sees the shift, and L_G holds it near the reference (AUC above 0.5).
# - winning (1e-1): it separates the two sets (AUC near 0.9 and rising) and L_G grows to about twice
#   the playing one's, yet the shift ends further out: a confident discriminator's score
#   saturates, and its gradient pulls less than the playing one's.
#
# What it does not show: anything about language. The real latents have 576 dimensions and the
# preference loss is not a constant force; `experiments/` measures the real game.

# %%
def toy_game(disc_lr, steps=150, force=1.0, policy_lr=0.05, seed=0):
    """-> [(step, ‖s‖, held-out AUC real > fake, L_G)] every 10 steps."""
    torch.manual_seed(seed)
    toy_cfg = ganpo.GANPOConfig(disc_dim=16, disc_heads=2, disc_layers=1, disc_dropout=0.0)
    toy_discs = ganpo.build_discriminators(8, toy_cfg)
    shift = torch.zeros(8, requires_grad=True)
    disc_opt = torch.optim.Adam(toy_discs.parameters(), lr=disc_lr)
    policy_opt = torch.optim.SGD([shift], lr=policy_lr)
    train_rng, test_rng = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(99)
    pole, push = torch.eye(8)[0], torch.eye(8)[1]

    def sample(rng, n):
        noise = torch.randn(4, n, 4, 8, generator=rng)
        real = {"chosen": noise[0] + pole, "rejected": noise[1] - pole}
        fake = {"chosen": noise[2] + pole + shift, "rejected": noise[3] - pole + shift}
        return real, fake, {side: torch.ones(n, 4, dtype=torch.bool) for side in real}

    ema, history = {}, []
    for step in range(steps):
        real, fake, mask = sample(train_rng, 16)
        detached = {side: h.detach() for side, h in fake.items()}
        ganpo.discriminator_backward(toy_discs, real, detached, mask, toy_cfg, ema, 1, nullcontext)
        disc_opt.step()
        disc_opt.zero_grad()
        l_g = ganpo.adversarial_loss(toy_discs, real, fake, mask, toy_cfg, ema, nullcontext)
        (-force * (shift @ push) + toy_cfg.adv_weight * l_g).backward()
        policy_opt.step()
        policy_opt.zero_grad()
        if step % 10 == 9:
            with torch.no_grad():
                real, fake, mask = sample(test_rng, 128)
                scores = {k: [v] for side in real
                          for k, v in ganpo.score(toy_discs, side, real, fake, mask).items()}
            aucs = ganpo.disc_aucs(scores)
            history.append((step + 1, float(shift.detach().norm()),
                            aucs["disc/auc_real_fake"], float(l_g.detach())))
    return history


regimes = {"slow (lr 1e-6)": 1e-6, "playing (lr 1e-2)": 1e-2, "winning (lr 1e-1)": 1e-1}
games = {name: toy_game(lr) for name, lr in regimes.items()}
for name, history in games.items():
    print(f"{name:18s} at the end: ‖s‖ {history[-1][1]:.2f}, L_G {history[-1][3]:.2f}; "
          "held-out AUC every 10 steps", [round(h[2], 2) for h in history])
no_pull = 150 * 0.05 * 1.0  # the force alone moves s by policy_lr · force a step
slow, playing, winning = games.values()
assert slow[-1][1] > 0.9 * no_pull and max(h[2] for h in slow[1:]) < 0.5  # outrun
assert playing[-1][1] < 0.2 * no_pull and min(h[2] for h in playing[3:]) > 0.6
assert min(h[2] for h in winning[-5:]) > 0.85 and playing[-1][1] < winning[-1][1] < slow[-1][1]
late = {name: sum(h[3] for h in history[-5:]) / 5 for name, history in games.items()}
print("L_G over the last 50 steps:", {name: round(v, 2) for name, v in late.items()})
slow_g, playing_g, winning_g = late.values()
assert slow_g < math.log(2) and winning_g > 1.5 * playing_g > 1.5 * math.log(2)

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
for name, history in games.items():
    steps, dist, aucs, _ = zip(*history)
    left.plot(steps, dist, marker="o", ms=3, label=name)
    right.plot(steps, aucs, marker="o", ms=3, label=name)
left.plot([0, 150], [0, no_pull], "k:", label="the force alone")
left.set(xlabel="policy step", ylabel="‖s‖: distance from the reference",
         title="how far the policy's latents drift")
right.axhline(0.5, color="grey", lw=0.8)
right.set(xlabel="policy step", ylabel="held-out AUC real > fake", ylim=(0, 1.02),
          title="what the discriminators see")
left.legend(fontsize=8)
fig.suptitle("A toy GANPO game: the discriminators' learning rate decides the regime")
fig.tight_layout()
figure = os.environ.get("WALKTHROUGH_FIGURE", "walkthrough.png")
fig.savefig(figure, dpi=100)
print("figure:", figure)
plt.show()

# %% [markdown]
# ## Where next
#
# - `ganpo.py` top to bottom: the same pieces, with micro-batches, autocast and torchrun
#   (`ganpo_step` is section 6 plus those).
# - `train.py`: the loop around `ganpo_step`; `python train.py` trains SmolLM2-135M on the bundled
#   pairs and prints these figures as it goes (`docs/metrics.md` says what each means).
# - `docs/exercises.md`: questions to predict, then check.
