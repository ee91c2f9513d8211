"""GANPO: DPO-style preference optimisation with a latent adversarial regulariser.

Paper: "Latent Adversarial Regularization for Offline Preference Optimization",
Jiang, Zhang, Xu, Haupt, Amato, Koyejo, arXiv:2601.22083 (2026).

Discriminators learn to tell the frozen reference model's last-layer hidden states ("real") from
the policy's ("fake") on the same (prompt, response) sequences; the policy is trained on
    L = L_OPO + λ · L_G
where L_OPO is DPO, SimPO or IPO and L_G rewards the policy for fooling the discriminators.

Symbols of the paper -> names in this file
    x, y_w, y_l        prompt, chosen, rejected (a batch is [chosen rows; rejected rows])
    π_θ, π_ref         policy, ref
    log π(y|x)         *_logps   (sum over response tokens; SimPO and IPO divide by the length)
    H(x, y)            *_hidden  (last decoder layer, after the final norm), (2B, T, d_model)
    D_w, D_l           discs["chosen"], discs["rejected"]
    m̄                  ema[...]  (detached running means of the discriminators' logits)
    λ, β, γ, ε, μ      adv_weight, beta, gamma, label_smoothing, ema_decay

Sections, in the paper's order: log-probs and latents; the base losses; the discriminator; the
adversarial losses and running means; one optimizer step; watching the game. docs/departures.md
lists where we depart from the authors' code. This module never parses argv and never prints.
torchrun: lines marked so call hooks of scaleout.py; on one process each of them does nothing.
"""
import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.checkpoint import checkpoint

import scaleout


def option(default, help):
    return field(default=default, metadata={"help": help})  # train.py turns each into a --flag


# the values each string field takes (GANPOConfig checks them)
CHOICES = {"loss": ("dpo", "simpo", "ipo"), "disc_tokens": ("all", "response"),
           "disc_loss": ("quad", "ragan"), "disc_init": ("xavier", "torch"),
           "update": ("alternating", "simultaneous"), "latent_reg": ("none", "mmd"),
           "disc_sn": ("torch", "legacy")}


@dataclass
class GANPOConfig:
    """The knobs of the objective and of the discriminators (train.py's Config extends it)."""
    loss: str = option("dpo", "base loss: dpo | simpo | ipo")
    beta: float = option(0.1, "β of DPO, IPO and SimPO (SimPO papers use ~2.0)")
    gamma: float = option(0.5, "γ, the SimPO target margin")
    label_smoothing: float = option(0.0, "ε of conservative DPO")
    adv_weight: float = option(1.0, "λ of L_G (authors: 1.0); 0 = plain OPO, no discriminators")
    disc_tokens: str = option("all", "tokens the discriminators see: all (authors') | response")
    disc_dim: int = option(512, "discriminator width (authors: 512)")
    disc_layers: int = option(2, "discriminator transformer layers (authors: 2)")
    disc_heads: int = option(8, "discriminator attention heads (authors: 8)")
    disc_dropout: float = option(0.1, "discriminator dropout (authors: 0.1)")
    disc_loss: str = option("quad", "quad (authors': real/fake + contrast) | ragan (real/fake)")
    disc_steps: int = option(1, "discriminator updates per policy step, on its latents (authors 1)")
    disc_init: str = option("xavier", "discriminator init: xavier (authors') | torch (defaults)")
    disc_max_grad_norm: float = option(0.0, "discriminator gradient clipping (0 = off, authors')")
    update: str = option("alternating", "alternating (D steps, then the policy meets the new D) | "
                         "simultaneous (an ablation: both players' gradients from the same D)")
    ema_decay: float = option(0.9, "μ of the running means of discriminator logits (authors: 0.9)")
    latent_reg: str = option("none", "none | mmd: + latent_weight · MMD²(H_θ, H_ref), no adversary")
    latent_weight: float = option(1.0, "λ_mmd of --latent_reg mmd")
    rpo_alpha: float = option(0.0, "α of RPO: + α · NLL(y_w|x) per token (0 = off; TRL: ~1.0)")
    logits_chunk: int = option(1024, "completion tokens per LM-head chunk (bounds float32 logits)")
    disc_sn: str = option("torch", "spectral norm: torch (a parametrization, 15 warm-up power "
                          "iterations) | legacy (the authors' hook: random start, no warm-up)")

    def __post_init__(self):
        self.check()

    def check(self):
        """Every field is checked where it is defined: a bad one raises ValueError naming it, for
        a config built in Python as for train.py's flags (which prints it with -- before it)."""
        checks = [(name, getattr(self, name) in allowed,
                   f"expected {', '.join(allowed[:-1])} or {allowed[-1]}")
                  for name, allowed in CHOICES.items()]
        checks += [("beta", self.beta > 0, "expected > 0"),
                   ("label_smoothing", 0 <= self.label_smoothing <= 0.5, "expected [0, 0.5]"),
                   ("disc_steps", self.disc_steps >= 1, "expected at least 1"),
                   ("disc_heads", self.disc_heads >= 1 and self.disc_dim % self.disc_heads == 0,
                    f"expected a divisor of disc_dim {self.disc_dim}"),
                   ("disc_layers", self.disc_layers >= 1, "expected at least 1"),
                   ("disc_dropout", 0 <= self.disc_dropout < 1, "expected a fraction in [0, 1)"),
                   ("ema_decay", 0 <= self.ema_decay <= 1, "expected [0, 1]"),
                   ("logits_chunk", self.logits_chunk >= 1, "expected at least 1")]
        checks += [(name, getattr(self, name) >= 0, "expected >= 0") for name in
                   ("adv_weight", "disc_max_grad_norm", "latent_weight", "rpo_alpha")]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} {getattr(self, name)}: {expected}")


def make_reference(policy):
    """π_ref: a frozen copy of the initial policy, in eval mode, never in any optimizer.
    LoRA: no copy; the policy's own base with its adapters switched off (scaleout.AdaptersOff)."""
    if scaleout.is_lora(policy):
        return scaleout.AdaptersOff(policy, forward_logps_and_hidden)
    ref = copy.deepcopy(policy).eval()
    ref.requires_grad_(False)
    return ref


# --- log-probs and latents: one forward of [chosen; rejected] per model -----------------------

def _token_logps(lm_head, hidden, labels, temperature=1.0):
    """log p(label) for each row of hidden (N, d): gather minus logsumexp, in float32.
    temperature != 1: under softmax(logits / temperature), what sampling at it draws from."""
    logits = lm_head(hidden).float()  # (N, V): float32 for this chunk only
    if temperature != 1:  # skipped in training: a pass over (N, V) and its backward
        logits = logits / temperature
    return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_token_logps(lm_head, h, labels, chunk_tokens=1024, temperature=1.0):
    """_token_logps over the rows of h (N, d) in chunks -> (N,). With gradients on, each chunk is
    checkpointed: its float32 (chunk, V) logits are freed after the forward, rebuilt in backward."""
    pieces = []
    for i in range(0, h.shape[0], chunk_tokens):
        args = (lm_head, h[i:i + chunk_tokens], labels[i:i + chunk_tokens], temperature)
        pieces.append(checkpoint(_token_logps, *args, use_reentrant=False)
                      if torch.is_grad_enabled() else _token_logps(*args))
    return torch.cat(pieces)


def forward_logps_and_hidden(model, batch, chunk_tokens=1024, temperature=1.0):
    """One forward -> (sum_logps (2B,), n_tokens (2B,), hidden (2B, T, d)).

    We call the decoder ourselves and apply the LM head only to completion positions: no logits
    for prompt or padding, no tuple of every layer's states (output_hidden_states=True). Logits at
    t predict token t+1, hence the one shift. Each LM-head chunk is checkpointed (chunked_...)."""
    if not hasattr(model, "get_decoder"):  # torchrun or LoRA's reference: a wrapper whose forward
        return model(batch, chunk_tokens, temperature)  # calls this function (scaleout.py)
    out = model.get_decoder()(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"].long())
    hidden = out.last_hidden_state  # (2B, T, d): after the final norm
    scored = batch["completion_mask"][:, 1:]  # (2B, T-1): position t scores token t+1
    labels = batch["input_ids"][:, 1:][scored]  # (N,)
    h = hidden[:, :-1][scored]  # (N, d)
    token_logps = chunked_token_logps(model.get_output_embeddings(), h, labels, chunk_tokens,
                                      temperature)  # (N,)
    row = torch.arange(scored.shape[0], device=scored.device)[:, None].expand_as(scored)[scored]
    sum_logps = torch.zeros(scored.shape[0], device=h.device, dtype=torch.float32)
    sum_logps = sum_logps.index_add(0, row, token_logps)  # (2B,)
    return sum_logps, scored.sum(-1), hidden


# --- base OPO losses: pure functions of (B,) tensors ------------------------------------------

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023), summed log-probs, all (B,):
        Δ = (log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))
        L = (1−ε)·(−log σ(β·Δ)) + ε·(−log σ(−β·Δ))        (ε > 0: conservative DPO)
    -> (B,) losses."""
    delta = ((policy_chosen_logps - ref_chosen_logps)
             - (policy_rejected_logps - ref_rejected_logps))
    return (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
            - label_smoothing * F.logsigmoid(-beta * delta))


def simpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, beta, gamma):
    """SimPO (Meng et al. 2024), length-averaged log-probs (B,), no reference:
        L = −log σ(β/|y_w|·log π_θ(y_w|x) − β/|y_l|·log π_θ(y_l|x) − γ)
    -> (B,) losses."""
    return -F.logsigmoid(beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma)


def ipo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, ref_chosen_avg_logps,
             ref_rejected_avg_logps, beta):
    """IPO (Azar et al. 2023), length-averaged log-probs (B,):
        L = (Δ_mean − 1/(2β))²
    -> (B,) losses."""
    delta = ((policy_chosen_avg_logps - ref_chosen_avg_logps)
             - (policy_rejected_avg_logps - ref_rejected_avg_logps))
    return (delta - 1 / (2 * beta)) ** 2


def opo_loss(cfg, policy_logps, ref_logps, n_tokens):
    """The base loss cfg.loss names, from [chosen; rejected] summed log-probs (2B,) -> (B,)."""
    B = policy_logps.shape[0] // 2
    if cfg.loss == "dpo":
        return dpo_loss(policy_logps[:B], policy_logps[B:], ref_logps[:B], ref_logps[B:],
                        cfg.beta, cfg.label_smoothing)
    policy_avg, ref_avg = policy_logps / n_tokens, ref_logps / n_tokens  # SimPO, IPO: means
    if cfg.loss == "simpo":
        return simpo_loss(policy_avg[:B], policy_avg[B:], cfg.beta, cfg.gamma)
    if cfg.loss == "ipo":
        return ipo_loss(policy_avg[:B], policy_avg[B:], ref_avg[:B], ref_avg[B:], cfg.beta)
    raise ValueError(f"--loss {cfg.loss}: expected dpo, simpo or ipo")


def chosen_nll(policy_logps, n_tokens):
    """RPO's term (Liu et al. 2024, arXiv:2405.16436): the NLL of the chosen responses per token,
        NLL = −Σ_i log π_θ(y_w,i|x_i) / Σ_i |y_w,i|       (token-weighted over the batch, as TRL)
    from [chosen; rejected] summed log-probs and token counts (2B,) -> a scalar."""
    B = policy_logps.shape[0] // 2
    return -policy_logps[:B].sum() / n_tokens[:B].sum()


def preference_metrics(cfg, policy_logps, ref_logps, n_tokens, losses):
    """The TRL-named dashboard from [chosen; rejected] (2B,) summed log-probs. The rewards are what
    the base loss compares, as TRL logs them: DPO β·(log π_θ − log π_ref) of sums, IPO the same of
    length-averaged log-probs, SimPO β·(length-averaged log π_θ) with no reference and no γ.
    accuracies and margins follow the rewards; logps/* are sums under every loss."""
    B = policy_logps.shape[0] // 2
    if cfg.loss == "dpo":
        rewards = cfg.beta * (policy_logps - ref_logps).float()
    elif cfg.loss == "ipo":
        rewards = cfg.beta * (policy_logps / n_tokens - ref_logps / n_tokens).float()
    else:  # simpo
        rewards = cfg.beta * (policy_logps / n_tokens).float()
    r_w, r_l = rewards[:B], rewards[B:]
    return {"opo/loss": losses.mean(), "rewards/chosen": r_w.mean(),
            "rewards/rejected": r_l.mean(), "rewards/accuracies": (r_w > r_l).float().mean(),
            "rewards/margins": (r_w - r_l).mean(), "logps/chosen": policy_logps[:B].mean(),
            "logps/rejected": policy_logps[B:].mean(), "length/chosen": n_tokens[:B].float().mean(),
            "length/rejected": n_tokens[B:].float().mean()}


# --- the discriminator ------------------------------------------------------------------------

def mean_pool(hidden, mask):
    """(B, T, d), (B, T) -> (B, d): the mean over the tokens the mask keeps."""
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)


def xavier_(module):
    """The authors' initialisation: xavier-uniform weight matrices, zero biases."""
    for name, p in module.named_parameters():
        if name.endswith("weight") and p.dim() == 2:
            nn.init.xavier_uniform_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def sn_linear(d_in, d_out, init, sn="torch"):
    """A spectral-normalised Linear; init "xavier" sets its weights before σ is first estimated.
    Each train-mode call runs one power iteration of σ's estimate. sn "torch" starts it with 15
    iterations; "legacy" (the authors' torch.nn.utils.spectral_norm) from random vectors, so its
    first estimates are low (~0.7 of σ for a 576 -> 512 layer) and the layer acts larger."""
    layer = nn.Linear(d_in, d_out)
    if init == "xavier":
        xavier_(layer)
    return spectral_norm(layer) if sn == "torch" else nn.utils.spectral_norm(layer)


class Discriminator(nn.Module):
    """Hidden states (B, T, d_model) + token mask (B, T) -> one logit per sequence (B,).
    Spectral-normalised input projection and head (D stays Lipschitz, so its gradient to the
    policy stays bounded), a learned positional table, pre-LN transformer layers that ignore
    masked tokens, and a mean pool over the tokens the mask keeps (the authors' code pools over
    padding too, so a row's score there depends on the longest row of its batch)."""

    def __init__(self, d_model, d_disc=512, n_layers=2, n_heads=8, dropout=0.1, max_len=2048,
                 init="xavier", sn="torch"):
        super().__init__()
        self.proj = sn_linear(d_model, d_disc, init, sn)
        self.pos = nn.Parameter(torch.randn(max_len, d_disc) * 0.02)
        layer = nn.TransformerEncoderLayer(d_disc, n_heads, 4 * d_disc, dropout, batch_first=True,
                                           activation="gelu", norm_first=True)
        # no nested-tensor fast path: it would make padded and unpadded rows compute differently
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        if init == "xavier":  # (torch's: the layers start as copies of one another)
            xavier_(self.encoder)
        self.head = nn.Sequential(sn_linear(d_disc, d_disc, init, sn), nn.GELU(),
                                  sn_linear(d_disc, 1, init, sn))

    def forward(self, hidden, mask):
        T = min(hidden.shape[1], self.pos.shape[0])  # longer inputs are cropped
        hidden, mask = hidden[:, :T], mask[:, :T]
        x = self.proj(hidden.to(self.pos.dtype)) + self.pos[:T]  # (B, T, d_disc)
        x = self.encoder(x, src_key_padding_mask=~mask)
        return self.head(mean_pool(x, mask)).squeeze(-1).float()  # (B,): padding never counts


def build_discriminators(d_model, cfg):
    """D_w and D_l, one per response polarity."""
    return nn.ModuleDict({side: Discriminator(d_model, cfg.disc_dim, cfg.disc_layers,
                                              cfg.disc_heads, cfg.disc_dropout,
                                              init=cfg.disc_init, sn=cfg.disc_sn)
                          for side in ("chosen", "rejected")})


def split_latents(batch, policy_hidden, ref_hidden, which):
    """[chosen; rejected] (2B, T, d) latents -> real, fake, mask: each {"chosen", "rejected"}.
    which: the tokens the discriminators see, all (prompt + response) or response."""
    B = policy_hidden.shape[0] // 2
    mask = batch["attention_mask"] if which == "all" else batch["completion_mask"]
    real = {"chosen": ref_hidden[:B], "rejected": ref_hidden[B:]}
    fake = {"chosen": policy_hidden[:B], "rejected": policy_hidden[B:]}
    return real, fake, {"chosen": mask[:B], "rejected": mask[B:]}


ROLES = ("real", "fake", "contrast")  # the latent sets a discriminator scores, in this order


def score(discs, side, real, fake, mask, roles=ROLES):
    """D_side's logits (B,) of the latent sets it plays with, in the order of `roles`:
    real = H_ref of its polarity, fake = H_θ of its polarity, contrast = H_ref of the other one."""
    other = "rejected" if side == "chosen" else "chosen"
    inputs = {"real": (real[side], mask[side]), "fake": (fake[side], mask[side]),
              "contrast": (real[other], mask[other])}
    return {f"{side}/{role}": discs[side](*inputs[role]) for role in roles}


# --- adversarial losses: the "quad" relativistic-average GAN with running means ---------------

def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(target)))


def pair_loss(above, below, m_above, m_below):
    """One relativistic-average pair, logits (B,) and running means m̄ (scalars):
        ½·[BCE(x − m̄_y, 1) + BCE(y − m̄_x, 0)]      x = above, y = below
    x should score above the running mean of y, and y below that of x. With x = real, y = fake it
    is RaGAN's discriminator loss (Jolicoeur-Martineau 2018), --disc_loss ragan: D then learns only
    to tell the reference's latents from the policy's, nothing of chosen/rejected."""
    return 0.5 * (bce(above - m_below, 1) + bce(below - m_above, 0))


def quad_disc_loss(real, fake, contrast, m_real, m_fake, m_contrast):
    """The "quad" loss of one discriminator, logits (B,) and running means m̄ (scalars):
        L_D = ¼·[BCE(a − m̄_f, 1) + BCE(f − m̄_a, 0) + BCE(f − m̄_n, 1) + BCE(n − m̄_f, 0)]
            = ½·[pair(a, f) + pair(f, n)]
    with a = real (reference, same polarity), f = fake (policy), n = contrast (reference, other
    polarity): D learns the ordering real > fake > contrast. The first pair is the real/fake game;
    the second (contrastive) pair teaches D what its polarity looks like, a preference signal."""
    return 0.25 * (bce(real - m_fake, 1) + bce(fake - m_real, 0)
                   + bce(fake - m_contrast, 1) + bce(contrast - m_fake, 0))


def generator_loss(fake_chosen, fake_rejected, m_real_chosen, m_real_rejected):
    """L_G = ½·[BCE(D_w(H_θ^w) − m̄_a, 1) + BCE(D_l(H_θ^l) − m̄_a', 1)]: the policy's latents
    should score above the running mean of the reference's. fake_* are (B,) logits that carry
    gradient to the policy through the frozen discriminators."""
    return 0.5 * (bce(fake_chosen - m_real_chosen, 1) + bce(fake_rejected - m_real_rejected, 1))


def ragan_generator_loss(fake, real, m_real):
    """RaGAN generator loss for one discriminator, logits (B,):
        L_G = ½·[BCE(f − m̄_a, 1) + BCE(a − mean(f), 0)]
    The second term uses this batch's mean of f, not its running mean: it carries gradient, so the
    policy is also paid for pulling the reference's relative score down, as in RaGAN."""
    return 0.5 * (bce(fake - m_real, 1) + bce(real - fake.mean(), 0))


def update_ema(ema, logits, decay):
    """m̄ ← μ·m̄ + (1−μ)·mean(x), detached; the first value initialises it. In place on `ema`."""
    for key, x in logits.items():
        value = scaleout.mean_over_ranks(x.detach().float().mean())  # torchrun: the same m̄ on all
        ema[key] = value if key not in ema else decay * ema[key] + (1 - decay) * value


def latent_mmd(real, fake, mask):
    """The non-adversarial control: MMD² between the policy's and the reference's latents, each
    side's sequences mean-pooled over `mask` (split_latents' real, fake, mask), chosen and rejected
    apart, then averaged. Per side, x_i = pool(H_θ) and y_i = pool(H_ref), (B, d), B >= 2:
        MMD²_u = 1/(B(B−1)) · Σ_{i≠j} [k(x_i,x_j) + k(y_i,y_j) − k(x_i,y_j) − k(x_j,y_i)]
    (Gretton et al. 2012, the unbiased estimate; 0 when x = y), k(a, b) = exp(−‖a−b‖² / 2σ²),
    σ = the median distance between the reference's pooled latents, detached."""
    values = []
    for side in ("chosen", "rejected"):
        x = mean_pool(fake[side].float(), mask[side])  # (B, d)
        y = mean_pool(real[side].float(), mask[side]).detach()
        B = x.shape[0]
        off = ~torch.eye(B, dtype=torch.bool, device=x.device)
        sigma2 = torch.cdist(y, y)[off].median().clamp(min=1e-6) ** 2
        k = lambda a, b: torch.exp(-torch.cdist(a, b) ** 2 / (2 * sigma2))  # noqa: E731
        k_xy = k(x, y)
        h = k(x, x) + k(y, y) - k_xy - k_xy.T  # (B, B)
        values.append(h[off].mean())
    return (values[0] + values[1]) / 2


# --- one GANPO optimizer step -----------------------------------------------------------------

def discriminator_backward(discs, real, fake, mask, cfg, ema, n_micro, autocast, learn=True):
    """Score detached latents with both discriminators, update the running means, and (if they
    learn) backward L_D / n_micro into them -> the loss, its two pairs and their accuracies.
    D_w sees real = H_ref^w, fake = H_θ^w, contrast = H_ref^l; D_l the mirror image. Frozen ones
    (learn=False) stay in eval mode with no gradient: no dropout and no spectral-norm power
    iteration, so the policy meets the same random networks at every step."""
    discs.train(learn)
    discs.requires_grad_(learn)
    metrics = {}
    for side in ("chosen", "rejected"):
        with autocast():  # one context: under bf16 its cast weights are shared by the three calls
            with torch.set_grad_enabled(learn):
                logits = score(discs, side, real, fake, mask, ("real", "fake"))
            with torch.set_grad_enabled(learn and cfg.disc_loss == "quad"):  # ragan: only logged
                logits.update(score(discs, side, real, fake, mask, ("contrast",)))
        update_ema(ema, logits, cfg.ema_decay)
        a, f, n = (logits[f"{side}/{role}"] for role in ROLES)
        m_a, m_f, m_n = (ema[f"{side}/{role}"] for role in ROLES)
        d_loss = (quad_disc_loss(a, f, n, m_a, m_f, m_n) if cfg.disc_loss == "quad"
                  else pair_loss(a, f, m_a, m_f))
        if learn:  # one discriminator's activations alive at a time
            (d_loss / n_micro).backward()
        with torch.no_grad():  # both pairs, whichever loss trains D
            metrics.update({f"disc/{side}/loss": d_loss.detach(),
                            f"disc/{side}/real_fake_loss": pair_loss(a, f, m_a, m_f),
                            f"disc/{side}/contrast_loss": pair_loss(f, n, m_f, m_n),
                            f"disc/{side}/real_fake_acc": (a > f).float().mean(),
                            f"disc/{side}/contrast_acc": (f > n).float().mean()})
    for key in ("loss", "real_fake_loss", "contrast_loss", "real_fake_acc", "contrast_acc"):
        metrics[f"disc/{key}"] = (metrics[f"disc/chosen/{key}"]
                                  + metrics[f"disc/rejected/{key}"]) / 2
    return metrics


def adversarial_loss(discs, real, fake, mask, cfg, ema, autocast):
    """L_G through the frozen discriminators (eval mode, no grad to them); the policy latents in
    `fake` are NOT detached, so the gradient reaches θ."""
    discs.eval()
    discs.requires_grad_(False)
    roles = ["fake"] if cfg.disc_loss == "quad" else ["fake", "real"]  # real: no gradient at all
    with autocast():
        d = {**score(discs, "chosen", real, fake, mask, roles),
             **score(discs, "rejected", real, fake, mask, roles)}
    if cfg.disc_loss == "quad":
        return generator_loss(d["chosen/fake"], d["rejected/fake"], ema["chosen/real"],
                              ema["rejected/real"])
    return 0.5 * sum(ragan_generator_loss(d[f"{side}/fake"], d[f"{side}/real"], ema[f"{side}/real"])
                     for side in ("chosen", "rejected"))


def forward_both(policy, ref, batch, cfg, autocast):
    """The policy's forward (with gradient where it is enabled) and the reference's (never) ->
    {"policy": (logps, n_tokens, hidden), "ref": (logps, hidden)}."""
    with autocast():
        policy_out = forward_logps_and_hidden(policy, batch, cfg.logits_chunk)
        with torch.no_grad():
            ref_logps, _, ref_hidden = forward_logps_and_hidden(ref, batch, cfg.logits_chunk)
    return {"policy": policy_out, "ref": (ref_logps, ref_hidden)}


def policy_backward(out, batch, discs, cfg, ema, n_micro, autocast):
    """L = L_OPO + λ·L_G (+ λ_mmd·MMD², + α·NLL: the controls) of one micro-batch, backward
    / n_micro into the policy -> its metrics. L_G goes through the discriminators as they are at
    this moment, frozen."""
    (policy_logps, n_tokens, policy_hidden), (ref_logps, ref_hidden) = out["policy"], out["ref"]
    real, fake, mask = split_latents(batch, policy_hidden, ref_hidden, cfg.disc_tokens)
    losses = opo_loss(cfg, policy_logps, ref_logps, n_tokens)  # (B,)
    loss, metrics = losses.mean(), {}
    if discs is not None:
        g_loss = adversarial_loss(discs, real, fake, mask, cfg, ema, autocast)
        loss = loss + cfg.adv_weight * g_loss
        metrics.update({"gen/loss": g_loss.detach(), **{f"ema/{k}": v for k, v in ema.items()}})
    if cfg.latent_reg == "mmd" and len(losses) < 2:
        raise ValueError("latent_reg mmd compares the pairs of a micro-batch: it needs at least 2")
    with torch.set_grad_enabled(cfg.latent_reg == "mmd"):  # else a free diagnostic, every run
        mmd = latent_mmd(real, fake, mask) if len(losses) > 1 else torch.zeros(())
    nll = chosen_nll(policy_logps, n_tokens)
    if cfg.latent_reg == "mmd":
        loss = loss + cfg.latent_weight * mmd
    if cfg.rpo_alpha:
        loss = loss + cfg.rpo_alpha * nll
    metrics.update({"latent/mmd": mmd.detach(), "nll/chosen": nll.detach()})
    (loss / n_micro).backward()
    metrics.update(preference_metrics(cfg, policy_logps.detach(), ref_logps, n_tokens,
                                      losses.detach()))
    return {**metrics, "loss": loss.detach(), "tokens": batch["attention_mask"].sum()}


def step_discriminators(discs, disc_opt, latents, cfg, ema, autocast):
    """cfg.disc_steps updates -> the first one's gradient norm. The first uses the gradients
    accumulated from `latents` (each micro-batch's real, detached fake, mask); each further one
    scores them again (fresh dropout; m̄ moves on too). More than one, because Adam moves a weight
    by about lr per update at most (GAN practice: n_critic updates, or TTUR's larger rate)."""
    norms = []
    for update in range(cfg.disc_steps):
        for real, fake, mask in (latents if update > 0 else []):
            discriminator_backward(discs, real, fake, mask, cfg, ema, len(latents), autocast)
        scaleout.average_gradients(discs)  # torchrun: every rank's copy takes the same step
        norms.append(scaleout.clip_grad_norm(discs.parameters(), cfg.disc_max_grad_norm))
        disc_opt.step()
        disc_opt.zero_grad(set_to_none=True)
    return norms[0]


def ganpo_step(policy, ref, discs, policy_opt, disc_opt, micro_batches, cfg, ema, autocast,
               max_grad_norm=1.0):
    """One optimizer step over k = len(micro_batches) micro-batches -> the step's mean metrics.

    cfg.update "alternating", the method's order (with k = 1, the authors'):
      1. both models' latents of each micro-batch, and the discriminators' gradients on them;
      2. the discriminators step, cfg.disc_steps times (disc_opt None: frozen, they never do);
      3. the policy's gradients, L_G through the updated, frozen discriminators; the policy steps.
    Memory: with k = 1 the policy's forward in 1 keeps its graph for 3. Keeping k graphs would
    undo what accumulation is for, so with k > 1 the forward in 1 runs without gradient and 3 runs
    it again: one more forward per micro-batch; only the step's last-layer latents are kept.
    "simultaneous", an ablation (our order before): 3 happens inside 1, so both players' gradients
    come from the same D_t, before its step. With no discriminator that steps (none at λ = 0, or
    frozen ones) the two orders are one computation, and the one-pass order runs: one forward per
    micro-batch. Backwards are divided by k: the gradients are means over the step (for OPO
    exactly as one big batch; m̄, updated per micro-batch, is not)."""
    cfg.check()  # again: a field may have been changed since the config was built
    k, learn = len(micro_batches), discs is not None and disc_opt is not None
    alternating = cfg.update == "alternating" and learn
    keep_graph = k == 1 or not alternating
    seen, per_micro = [], []
    for i, batch in enumerate(micro_batches):  # 1 (simultaneous: and 3)
        with torch.set_grad_enabled(keep_graph):
            out = forward_both(policy, ref, batch, cfg, autocast)
        m, latents = {}, None
        if discs is not None:
            real, fake, mask = split_latents(batch, out["policy"][2], out["ref"][1],
                                             cfg.disc_tokens)
            latents = (real, {key: v.detach() for key, v in fake.items()}, mask)
            m = discriminator_backward(discs, *latents, cfg, ema, k, autocast, learn)
        if not alternating:
            scaleout.sync_gradients(policy, i == k - 1)  # torchrun: reduce gradients once a step
            m.update(policy_backward(out, batch, discs, cfg, ema, k, autocast))
        seen.append((batch, out if alternating and keep_graph else {"ref": out["ref"]}, latents))
        per_micro.append(m)
    if learn:  # 2
        d_norm = step_discriminators(discs, disc_opt, [s[2] for s in seen], cfg, ema, autocast)
    for i, (batch, out, _) in enumerate(seen if alternating else []):  # 3
        scaleout.sync_gradients(policy, i == k - 1)  # torchrun: reduce gradients once a step
        if not keep_graph:  # the policy's forward again, now with gradient
            with autocast():
                out["policy"] = forward_logps_and_hidden(policy, batch, cfg.logits_chunk)
        per_micro[i].update(policy_backward(out, batch, discs, cfg, ema, k, autocast))
    metrics = {key: torch.stack([m[key].float() for m in per_micro]).mean()
               for key in per_micro[0] if key != "tokens"}
    metrics["tokens"] = sum(m["tokens"] for m in per_micro)
    if learn:
        metrics["disc/grad_norm"] = d_norm
    metrics["policy/grad_norm"] = scaleout.clip_grad_norm(policy.parameters(), max_grad_norm)
    policy_opt.step()
    policy_opt.zero_grad(set_to_none=True)
    return {key: float(v) for key, v in metrics.items()}


# --- watching the game, and held-out evaluation -----------------------------------------------

def auc(above, below):
    """P(an `above` score > a `below` score) over all pairs, ties ½ (Mann-Whitney U / n·m):
    0.5 = cannot tell them apart, 1 = always ranks `above` higher."""
    diff = above.double()[:, None] - below.double()[None, :]  # (n, m)
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def relative_change(module, initial):
    """‖θ − θ_0‖ / ‖θ_0‖ over a module's parameters; `initial`: {name: tensor} of θ_0."""
    params = list(module.named_parameters())
    num = sum(float((p.detach().float() - initial[n].float()).pow(2).sum()) for n, p in params)
    den = sum(float(initial[n].float().pow(2).sum()) for n, _ in params)
    return math.sqrt(num / den)


def disc_aucs(scores):
    """The trained discriminators' held-out view from their logits by role (see evaluate)."""
    s = {key: torch.cat(v) for key, v in scores.items()}
    out = {}
    for side in ("chosen", "rejected"):
        out[f"disc/{side}/auc_real_fake"] = auc(s[f"{side}/real"], s[f"{side}/fake"])
        out[f"disc/{side}/auc_fake_contrast"] = auc(s[f"{side}/fake"], s[f"{side}/contrast"])
    for key in ("auc_real_fake", "auc_fake_contrast"):
        out[f"disc/{key}"] = (out[f"disc/chosen/{key}"] + out[f"disc/rejected/{key}"]) / 2
    return out


@torch.no_grad()
def evaluate(policy, ref, batches, cfg, autocast, latents=False, ref_cache=None, discs=None):
    """Preference metrics on held-out batches, averaged over pairs.
    latents=True: also returns {"policy", "ref"}: mean-pooled last-layer states (2·pairs, d).
    discs: also the discriminators' view of these pairs, each one's and their mean:
        disc/auc_real_fake      AUC of reference over policy latents of its polarity (0.5 = chance)
        disc/auc_fake_contrast  AUC of policy latents over reference latents of the other polarity
    ref_cache: a dict kept between calls; the reference never changes, so it runs once."""
    sums, n, pooled, scores = {}, 0, {"policy": [], "ref": []}, {}
    need_hidden = latents or discs is not None
    if discs is not None:
        discs.eval()
    for i, padding in scaleout.share_of_batches(len(batches)):  # torchrun: this rank's share
        batch = batches[i]
        cached = ref_cache.get(i) if ref_cache is not None else None
        with autocast():
            policy_logps, n_tokens, policy_hidden = forward_logps_and_hidden(policy, batch,
                                                                             cfg.logits_chunk)
            if cached is None or (need_hidden and cached[1] is None):
                ref_logps, _, ref_hidden = forward_logps_and_hidden(ref, batch, cfg.logits_chunk)
                if ref_cache is not None:
                    ref_cache[i] = (ref_logps, ref_hidden if need_hidden else None)
            else:
                ref_logps, ref_hidden = cached
        if padding:  # torchrun: the collectives needed this forward, the figures do not
            continue
        losses = opo_loss(cfg, policy_logps, ref_logps, n_tokens)
        B = losses.shape[0]
        for key, v in preference_metrics(cfg, policy_logps, ref_logps, n_tokens,
                                         losses).items():
            sums[key] = sums.get(key, 0.0) + float(v) * B
        n += B
        if latents:
            pooled["policy"].append(mean_pool(policy_hidden.float(), batch["attention_mask"]))
            pooled["ref"].append(mean_pool(ref_hidden.float(), batch["attention_mask"]))
        if discs is not None:
            real, fake, mask = split_latents(batch, policy_hidden, ref_hidden, cfg.disc_tokens)
            with autocast():
                for side in ("chosen", "rejected"):
                    for key, logits in score(discs, side, real, fake, mask).items():
                        scores.setdefault(key, []).append(logits.float())
    sums, n, scores, pooled = scaleout.gather_over_ranks(sums, n, scores, pooled)  # torchrun
    result = {key: v / n for key, v in sums.items()}
    if discs is not None:
        result.update(disc_aucs(scores))
    return (result, {k: torch.cat(v) for k, v in pooled.items()}) if latents else result
