"""Label-free training-health metrics: pure functions on tensors, no state.

- teacher entropy (and its ratio to ln K): near 1 means the teacher's targets are uniform and the
  student learns nothing; near 0 for *every* image alike means a one-prototype collapse;
- student–teacher KL: how far the student still is from the teacher's targets;
- RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of a feature
  matrix, the effective number of directions the features use;
- alignment and uniformity (Wang & Isola 2020) of L2-normalised features;
- embedding spread: the mean per-dimension std over a batch of an objective's own L2-normalised
  embeddings (projector or node embeddings), which falls towards 0 when a head maps every input to
  one point even while the backbone features stay spread (head/projector collapse);
- match health: entropy over ln N and mean largest weight of soft correspondences over N candidates
  (GLARE's cross-view region matching): near 1 and near 1/N when matching is uniform.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def entropy(p: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the distributions along the last axis of ``p``."""
    p = p.float()
    return -(p * (p + eps).log()).sum(-1).mean()


def entropy_ratio(p: torch.Tensor) -> torch.Tensor:
    """Mean entropy of ``p`` divided by ln K (K = size of the last axis): 1 for uniform targets."""
    return entropy(p) / math.log(p.shape[-1])


def kl_divergence(p: torch.Tensor, log_q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean KL(p || q) over rows, with q given as log-probabilities."""
    p = p.float()
    return (p * ((p + eps).log() - log_q.float())).sum(-1).mean()


def rankme(features: torch.Tensor, eps: float = 1e-7, centre: bool = False) -> torch.Tensor:
    """Effective rank of an N×D feature matrix: exp(entropy of its singular values / their sum).

    ``centre=True`` subtracts the mean row first, so a direction every row shares (a frozen base's
    common component) counts as nothing instead of as the largest singular value.
    """
    features = features.float()
    if centre:
        features = features - features.mean(0, keepdim=True)
    s = torch.linalg.svdvals(features)
    p = s / s.sum().clamp_min(1e-12) + eps
    return torch.exp(-(p * p.log()).sum())


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Mean ||f(x_i) - f(y_i)||^alpha over positive pairs (rows), features L2-normalised. Lower is better."""
    x, y = F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1)
    return (x - y).norm(dim=-1).pow(alpha).mean()


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log mean over pairs i<j of exp(-t ||f(x_i) - f(x_j)||²), features L2-normalised. Lower is better."""
    x = F.normalize(x.float(), dim=-1)
    return torch.pdist(x).pow(2).mul(-t).exp().mean().log()


def embedding_spread(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the std over the batch (rows) of L2-normalised N×D embeddings.

    0 when every row is the same point (a collapsed head), about 1/sqrt(D) for isotropic rows; it
    depends on D, so compare a run with its own start (the collapse guard does).
    """
    z = F.normalize(embeddings.detach().float().reshape(-1, embeddings.shape[-1]), dim=-1)
    return z.std(dim=0, unbiased=False).mean()


def match_health(weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Soft correspondences (...×N, rows sum to 1): entropy over ln N, and the mean largest weight.

    Uniform matching gives 1 and 1/N; a one-to-one match gives 0 and 1.
    """
    with torch.no_grad():
        w = weights.detach().float()
        return {"match_entropy": entropy_ratio(w), "match_top1": w.max(-1).values.mean()}


def marginal_entropy_ratio(p: torch.Tensor) -> torch.Tensor:
    """Entropy of the batch-mean distribution over ln K: near 0 when every row picks the same prototypes."""
    return entropy_ratio(p.reshape(-1, p.shape[-1]).mean(0))


def distribution_health(teacher_probs: torch.Tensor, student_log_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropy, entropy ratio, marginal entropy ratio and KL for matched teacher/student distributions (last axis K).

    A healthy teacher has a low per-sample entropy ratio (sharp targets) and a high marginal one
    (different images, different prototypes); uniform targets give 1 and 1, a one-prototype
    collapse gives 0 and 0.
    """
    with torch.no_grad():
        return {
            "teacher_entropy": entropy(teacher_probs),
            "teacher_entropy_ratio": entropy_ratio(teacher_probs),
            "teacher_marginal_entropy_ratio": marginal_entropy_ratio(teacher_probs),
            "student_teacher_kl": kl_divergence(teacher_probs, student_log_probs),
        }
