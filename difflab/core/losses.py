"""The simple denoising loss (Ho et al. 2020, eq. 14), with a choice of target and weighting.

One training example: draw t ~ process.sample_t, eps ~ N(0, I), x_t = alpha x_0 + sigma eps, and
regress the denoiser's reading of ``target`` against its true value.

Every target is the same regression in other coordinates. With x_t fixed, an error in x_0 shows up as
    eps-error   = -(alpha / sigma) x0-error                      weight SNR = alpha^2 / sigma^2
    v-error     = -((alpha^2 + sigma^2) / sigma) x0-error        weight (alpha^2 + sigma^2)^2 / sigma^2 (VP: SNR + 1)
    score-error = (alpha / sigma^2) x0-error                     weight alpha^2 / sigma^4
so a plain MSE on a target puts that target's *native weight* on the x0-MSE. A weighting names the
effective weight on the x0-MSE instead, and the loss multiplies the target MSE by effective / native:
    'none'     the target's native weight (plain MSE of the target)
    'snr'      SNR                      (= plain eps-MSE, whatever the target)
    'min_snr'  min(SNR, gamma)          (Hang et al. 2023, "Min-SNR weighting")

The config's ``objective`` picks what trains (runs/diffusion.py builds the callable):
    'simple'   this loss
    'hybrid'   L_simple + lambda L_vlb (Nichol & Dhariwal 2021, Sec. 3.1): HybridLoss, for a learned variance
    'vlb'      the continuous-time bound (Kingma et al. 2021): ContinuousVLBLoss, for a fixed or learned schedule
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from .likelihood import (
    bound_t_min,
    continuous_decoder_nll,
    continuous_prior_kl,
    decoder_log_variance,
    decoder_nll,
    diffusion_term,
    log_snr_slope,
    reverse_kl,
    reverse_log_variance,
)
from .parameterize import TARGETS, Target, expand_t, score_from_eps, v_from_x0_eps
from .processes import broadcast, has_parameters

WEIGHTINGS = ("none", "snr", "min_snr")
Objective = Literal["simple", "hybrid", "vlb"]  # what a denoiser run trains on (see the module doc)
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)


def snr_factor(target: Target, alpha: Tensor, sigma: Tensor) -> Tensor:
    """SNR / native weight of ``target``: the factor turning a plain target-MSE into an SNR-weighted x0-MSE."""
    a2, s2 = alpha**2, sigma**2
    return {"x0": a2 / s2, "eps": torch.ones_like(a2), "v": a2 / (a2 + s2) ** 2, "score": s2}[target]


def inverse_native_weight(target: Target, alpha: Tensor, sigma: Tensor) -> Tensor:
    """1 / native x0-weight of ``target`` (finite at sigma = 0)."""
    a2, s2 = alpha**2, sigma**2
    return {"x0": torch.ones_like(a2), "eps": s2 / a2, "v": s2 / (a2 + s2) ** 2, "score": s2**2 / a2}[target]


def loss_weight(target: Target, weighting: str, alpha: Tensor, sigma: Tensor, gamma: float = 5.0) -> Tensor:
    """Per-example factor on the plain MSE of ``target`` (float64, shape of alpha).

    Written without forming SNR itself, so it stays finite at sigma -> 0 and alpha -> 0:
    min(SNR, gamma) / native = min(SNR / native, gamma / native)."""
    if weighting == "none":
        return torch.ones_like(alpha)
    if weighting == "snr":
        return snr_factor(target, alpha, sigma)
    if weighting == "min_snr":
        return torch.minimum(snr_factor(target, alpha, sigma), gamma * inverse_native_weight(target, alpha, sigma))
    raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}")


@dataclass
class SimpleLoss:
    """E_{t, eps} [ w(t) ||pred.as_(target) - target_true||^2 ], the squared error averaged over dimensions.

    target: 'x0', 'eps', 'v', 'score', or None for the denoiser's native target (no conversion).
    weighting: 'none', 'snr' or 'min_snr' (see the module docstring); gamma is Min-SNR's clamp.
    objective: 'simple', 'hybrid' or 'vlb' (see the module docstring); vlb_weight is the hybrid's lambda."""

    target: Target | None = None
    weighting: str = "none"
    gamma: float = 5.0
    objective: Objective = "simple"
    vlb_weight: float = 1e-3

    def to_dict(self) -> dict:
        """Its fields as config.json holds them: the objective's only when it is not the simple loss."""
        d = asdict(self)
        if self.objective == "simple" and self.vlb_weight == 1e-3:
            del d["objective"], d["vlb_weight"]
        return d

    def __post_init__(self):
        if self.target is not None and self.target not in TARGETS:
            raise ValueError(f"unknown loss target {self.target!r}; choose one of {TARGETS} or None")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.weighting!r}; choose one of {WEIGHTINGS}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {OBJECTIVES}")
        if not self.vlb_weight > 0:
            raise ValueError(f"vlb_weight must be > 0, got {self.vlb_weight}")

    def __call__(
        self,
        denoiser,
        x0: Tensor,
        *,
        generator: torch.Generator | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        cond: Mapping | None = None,
        reduction: str = "mean",
        pred=None,
    ) -> Tensor:
        """The loss on a batch x0 (B, ...): a scalar for reduction='mean', the (B,) per-example losses for 'none'.

        t (B,) and noise (like x0) are drawn from ``generator`` unless given; cond is passed as
        denoiser(x_t, t, **cond); ``pred``, the denoiser's Prediction at that x_t when the caller has it."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"unknown reduction {reduction!r}; choose 'mean' or 'none'")
        process = denoiser.process
        B = x0.shape[0]
        if t is None:
            t = process.sample_t(B, generator)
        t = expand_t(t, x0)
        if noise is None:
            device = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
        if pred is None:
            x_t = process.q_sample(x0, t, noise)
            pred = denoiser(x_t, t, **(cond or {}))

        target = self.target or pred.target
        alpha, sigma = process.alpha(t), process.sigma(t)  # (B,) float64
        a, s = broadcast(alpha, x0), broadcast(sigma, x0)
        true = {
            "x0": x0,
            "eps": noise,
            "v": v_from_x0_eps(x0, noise, a, s),
            "score": score_from_eps(noise, s),
        }[target]
        mse = ((pred.as_(target) - true) ** 2).flatten(1).mean(1)  # (B,)
        per_example = loss_weight(target, self.weighting, alpha, sigma, self.gamma).to(mse) * mse
        return per_example.mean() if reduction == "mean" else per_example


@dataclass
class HybridLoss:
    """L_hybrid = L_simple + lambda T L_vlb,t (Nichol & Dhariwal 2021, Sec. 3.1), for a denoiser that learns its
    reverse variance: at each example's t the bound's term (the KL into t-1, or at t = 1 the decoder's
    -log p(x_0 | x_1)) in bits/dim, with the mean's x0_hat detached, so L_vlb trains the variance alone and
    L_simple the mean; T L_vlb,t is an unbiased draw of the whole bound, and lambda = 1e-3 keeps it from
    swamping the MSE (their improved-diffusion scales the same way: T/1000)."""

    simple: SimpleLoss
    decoder: str = "discretized"

    def __call__(self, denoiser, x0: Tensor, *, t: Tensor, noise: Tensor, cond=None, reduction: str = "mean"):
        process = denoiser.process
        t = expand_t(t, x0)
        x_t = process.q_sample(x0, t, noise)
        pred = denoiser(x_t, t, **(cond or {}))
        simple = self.simple(denoiser, x0, t=t, noise=noise, pred=pred, reduction="none")  # (B,)
        x0_hat = pred.x0.detach()
        s = (t - 1).clamp(min=0)
        first = t <= 1
        # the decoder's variance at t = 1 interpolates sigma_1^2 and the next step's beta_tilde (decoder_log_variance)
        log_var = torch.where(
            first.reshape(-1, *[1] * (x0.ndim - 1)),
            decoder_log_variance(process, t.clamp(max=1), t.clamp(max=1) + 1, "learned", pred.var_frac),
            reverse_log_variance(process, t.clamp(min=2), s.clamp(min=1), "learned", pred.var_frac),
        )
        kl = reverse_kl(process, x0, x_t, t.clamp(min=2), s.clamp(min=1), x0_hat, log_var)
        nll = decoder_nll(x0, x0_hat, log_var, self.decoder)
        D = x0[0].numel()
        vlb = torch.where(first, nll, kl) / (D * math.log(2))  # (B,) bits/dim
        per_example = simple + self.simple.vlb_weight * process.T * vlb.to(simple)
        return per_example.mean() if reduction == "mean" else per_example


@dataclass
class ContinuousVLBLoss:
    """The continuous-time bound as a loss (Kingma et al. 2021, eq. 17 and Sec. 3.5), per example in bits/dim:
    the prior KL, VDM's decoder at t_min and one draw of L_inf = 1/2 int -lambda'(t) ||eps - eps_hat||^2 dt,
    with the loop's t mapped onto [t_min, 1] (likelihood.bound_t_min). For a learned schedule (LearnedVP) the
    end points train on the bound and the interior on its variance (GammaNet.variance_gradient)."""

    decoder: str = "discretized"

    def __call__(self, denoiser, x0: Tensor, *, t: Tensor, noise: Tensor, cond=None, reduction: str = "mean"):
        process = denoiser.process
        t_min, t_max = bound_t_min(process), float(process.t_max)
        t = t_min + expand_t(t, x0) * ((t_max - t_min) / t_max)
        learned = has_parameters(process)
        with process.gamma.variance_gradient() if learned else contextlib.nullcontext() as holder:
            x_t = process.q_sample(x0, t, noise)
            pred = denoiser(x_t, t, **(cond or {}))
            diffusion = diffusion_term(process, pred.eps, noise, log_snr_slope(process, t), t_max - t_min)
            if learned:  # 2 L in the loss's own units (bits/dim), so d E[L^2] = E[2 L dL] is on the loss's scale
                holder["w"] = 2 * diffusion.detach().to(torch.float64) / (x0[0].numel() * math.log(2))
        eps0 = torch.randn_like(x0)  # the decoder's noise: the loop seeds torch's generator per step and rank
        rest = continuous_prior_kl(process, x0) + continuous_decoder_nll(process, x0, t_min, eps0, self.decoder)
        per_example = (diffusion + rest.to(diffusion)) / (x0[0].numel() * math.log(2))
        return per_example.mean() if reduction == "mean" else per_example


@dataclass
class ClassifierLoss:
    """Cross-entropy of a noise-aware classifier on x_t ~ q(x_t | x_0) (Dhariwal & Nichol 2021, section 4):
    the same draws of t and eps as the denoising loss, so it learns p(y | x_t, t) on the denoiser's process.

    ``model(x_t, t)`` is the classifier network behind the Denoiser wrapper (the same input scaling as the
    denoiser it guides); its Prediction's value holds the logits. The labels come in cond['class_labels']
    and are the target, never an input."""

    def __call__(
        self, model, x0: Tensor, *, t: Tensor, noise: Tensor, cond: Mapping, reduction: str = "mean"
    ) -> Tensor:
        labels = cond["class_labels"]
        x_t = model.process.q_sample(x0, t, noise)
        logits = model(x_t, t).value.float()  # (B, K)
        return torch.nn.functional.cross_entropy(logits, labels.long(), reduction=reduction)


@dataclass
class NoiseAugmented:
    """Noise conditioning augmentation (Ho et al. 2021, cascaded diffusion, section 4.3): the low-resolution
    input is itself corrupted, low_res + a eps' with a ~ U(0, a_max) per sample, and the network is told a
    (cond['low_res_noise']), so at sampling time it copes with imperfect low-resolution inputs (a cascade's
    own samples) and a may be chosen. The draws come from torch's generator, which the training loop seeds
    per step (and rank), so a resumed run draws the same."""

    base: SimpleLoss
    a_max: float = 0.2

    def __call__(
        self, model, x0: Tensor, *, t: Tensor, noise: Tensor, cond: Mapping, reduction: str = "mean", generator=None
    ) -> Tensor:
        low = cond["low_res"]
        a = torch.rand(len(low), device=low.device) * self.a_max
        cond = {**cond, "low_res": low + broadcast(a, low) * torch.randn_like(low), "low_res_noise": a}
        return self.base(model, x0, t=t, noise=noise, cond=cond, reduction=reduction)


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over every other dimension:
    1/2 sum(mean^2 + exp(logvar) - 1 - logvar)  (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)  # (B,)


RECONSTRUCTIONS = ("l1", "l2")


@dataclass
class AutoencoderLoss:
    """The KL autoencoder's loss (Rombach et al. 2022, appendix G): per image, the reconstruction error summed
    over pixels (|x - x_hat| for l1, (x - x_hat)^2 for l2) plus kl_weight times the KL of q(z | x) to N(0, I)
    summed over the latent; averaged over the batch and divided by the number of pixel values, which rescales
    the loss for the learning rate and leaves the trade-off alone. A small kl_weight (the paper's 1e-6 regime)
    keeps the latent nearly deterministic and only loosely tied to unit scale: the latent scale fixes that
    afterwards (autoencoder.py). ``model.net(x)`` returns (x_hat, mean, logvar); t, noise and cond are unused
    (the loop draws them for every loss).

    With disc_weight > 0 (the network needs a discriminator) an adversarial term joins once the discriminator
    has seen disc_start batches (the warm-up; its clock is a buffer saved with the weights, so a resumed run
    keeps it): disc_weight * (generator + discriminator) with the hinge losses

        generator      -mean D(x_hat)                                  gradient to the autoencoder only
        discriminator  mean relu(1 - D(x)) + mean relu(1 + D(x_hat))   gradient to D only

    (D's weights are detached in the first, x_hat in the second), so one optimizer step of the sum is the
    simultaneous update of both players."""

    recon: str = "l1"
    kl_weight: float = 1e-6
    disc_weight: float = 0.0
    disc_start: int = 0

    def __post_init__(self):
        if self.recon not in RECONSTRUCTIONS:
            raise ValueError(f"unknown reconstruction loss {self.recon!r}; choose one of {RECONSTRUCTIONS}")
        if not self.kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if not self.disc_weight >= 0 or not (isinstance(self.disc_start, int) and self.disc_start >= 0):
            raise ValueError(f"disc_weight and disc_start must be >= 0, got {self.disc_weight}, {self.disc_start}")

    def to_dict(self) -> dict:
        """Its fields as a run's config.json holds them: the discriminator's only when it has one."""
        d = asdict(self)
        if self.disc_weight == 0 and self.disc_start == 0:
            del d["disc_weight"], d["disc_start"]
        return d

    def __call__(self, model, x0: Tensor, *, t=None, noise=None, cond=None) -> Tensor:
        x_hat, mean, logvar = model.net(x0)
        err = (x0 - x_hat.float()).abs() if self.recon == "l1" else (x0 - x_hat.float()).pow(2)
        per_image = err.flatten(1).sum(1) + self.kl_weight * kl_to_standard_normal(mean.float(), logvar.float())  # (B,)
        loss = per_image.mean() / x0[0].numel()
        if self.disc_weight > 0:
            net = getattr(model.net, "module", model.net)  # DistributedDataParallel keeps the network in .module
            loss = loss + self.disc_weight * self.adversarial(net.discriminator, x0, x_hat)
        return loss

    def adversarial(self, disc, x0: Tensor, x_hat: Tensor) -> Tensor:
        """The two hinge terms (zero during the warm-up); advances the discriminator's batch clock in training."""
        if disc is None:
            raise ValueError(
                "disc_weight > 0 needs an autoencoder with a discriminator (AutoencoderConfig.discriminator > 0)"
            )
        on = int(disc.batches) >= self.disc_start
        if torch.is_grad_enabled():
            disc.batches += 1
        if not on:
            return x_hat.new_zeros(()).float()
        frozen = {name: p.detach() for name, p in disc.named_parameters()}
        generator = -torch.func.functional_call(disc, frozen, (x_hat,)).float().mean()
        real, fake = disc(x0).float(), disc(x_hat.detach()).float()
        return generator + F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def contrastive_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    hard_emb: Tensor | None = None,
    hard_mask: Tensor | None = None,
) -> Tensor:
    """CLIP's symmetric cross-entropy (Radford et al. 2021): logits = exp(logit_scale) * cos(image_i, text_j)
    (B, B); the mean of the cross-entropy over rows (image -> its caption) and over columns (caption -> its image).

    ``hard_emb`` (K B, E): K hard negative captions per image (e.g. its caption with the sides swapped, then with
    the colours swapped), added to every image's candidates in the image -> caption direction, (B, B + K B)
    (Yuksekgonul et al. 2023, NegCLIP); ``hard_mask`` (K B,) bool: which of them exist (a caption without a side
    word has no side swap)."""
    image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    scale = logit_scale.exp()
    logits = scale * image_emb @ text_emb.T
    target = torch.arange(len(logits), device=logits.device)
    if hard_emb is None:
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    hard = scale * image_emb @ F.normalize(hard_emb, dim=-1).T  # (B, K B): image i against every swapped caption
    if hard_mask is not None:
        hard = hard.masked_fill(~hard_mask[None, :], float("-inf"))
    return (F.cross_entropy(torch.cat([logits, hard], 1), target) + F.cross_entropy(logits.T, target)) / 2


HARD_NEGATIVES = ("none", "sides", "sides+colours")
HARD_NEGATIVE_TOKENS = {  # the condition entries each kind of hard negative reads: (token ids, mask)
    "sides": ("swap_tokens", "swap_token_mask"),
    "colours": ("colour_swap_tokens", "colour_swap_token_mask"),
}


def hard_negative_kinds(hard_negatives: str) -> tuple[str, ...]:
    """The swaps a ContrastiveLoss setting makes hard negatives of: 'sides+colours' -> ('sides', 'colours')."""
    return () if hard_negatives == "none" else tuple(hard_negatives.split("+"))


@dataclass
class ContrastiveLoss:
    """The training loop's loss for a CLIP network: contrastive_loss over the (per-process) batch; the captions
    come as cond['tokens'] and cond['token_mask']; with ``hard_negatives='sides'`` each caption's side-swapped
    twin comes as cond['swap_tokens'] / cond['swap_token_mask'] and is a hard negative for its image;
    'sides+colours' adds its colour-swapped twin (the two items' colours exchanged) as cond['colour_swap_tokens'] /
    cond['colour_swap_token_mask'] (HARD_NEGATIVE_TOKENS)."""

    hard_negatives: str = "none"

    def __post_init__(self):
        if self.hard_negatives not in HARD_NEGATIVES:
            raise ValueError(
                f"unknown hard negatives {self.hard_negatives!r}; choose one of {', '.join(HARD_NEGATIVES)}"
            )

    def to_dict(self) -> dict:
        """Its fields as a CLIP run's config.json holds them: nothing without hard negatives."""
        return {} if self.hard_negatives == "none" else asdict(self)

    def __call__(self, model, x0: Tensor, *, t=None, noise=None, cond=None) -> Tensor:
        tokens, mask = cond["tokens"], cond["token_mask"]
        if self.hard_negatives == "none":
            image_emb, text_emb, scale = model.net(x0, tokens=tokens, token_mask=mask)
            return contrastive_loss(image_emb.float(), text_emb.float(), scale.float())
        names = [HARD_NEGATIVE_TOKENS[kind] for kind in hard_negative_kinds(self.hard_negatives)]
        twins, masks = [cond[ids] for ids, _ in names], [cond[m] for _, m in names]
        # one forward over every caption set (the towers are independent: B images, (1 + K) B captions)
        image_emb, both, scale = model.net(x0, tokens=torch.cat([tokens, *twins]), token_mask=torch.cat([mask, *masks]))
        text_emb, hard = both[: len(tokens)], both[len(tokens) :]
        # a caption that a swap leaves unchanged (no side word; two items of one colour) is its own twin: no negative
        has_swap = torch.cat([(twin != tokens).any(1) for twin in twins])
        return contrastive_loss(image_emb.float(), text_emb.float(), scale.float(), hard.float(), has_swap)
