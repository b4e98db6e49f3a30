"""Sample-quality statistics of generated images, from a classifier's outputs.

- Frechet distance between Gaussians fitted to features of two image sets (M. Heusel et
  al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium", NeurIPS 2017: FID, there with Inception-v3's features; here with those of
  genjax's MNIST classifier, so the figures compare with each other, not with published
  FIDs).
- Inception Score, exp(E_x KL(p(y|x) || p(y))) (T. Salimans et al., "Improved Techniques for
  Training GANs", NeurIPS 2016), with the MNIST classifier's class probabilities; computed
  over the whole sample set at once (no splits) with exactly rounded sums, so it does not
  depend on the samples' order.
- Class coverage: how many of the classes the classifier assigns to at least one sample,
  and the entropy of that histogram (mode collapse shows as few classes, low entropy).

Everything here runs on the host in float64 (NumPy, SciPy).
"""

from __future__ import annotations

import math

import numpy as np


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and covariance (F, F) of ``features`` (N, F), float64; the covariance is
    the unbiased estimate (divided by N - 1), as ``np.cov``.

    With N <= F samples the covariance has rank at most N - 1 < F: it is singular, and a
    Frechet distance computed from it is still defined (see :func:`frechet_distance`) but
    dominated by the sample size. Distances are comparable only between sets of the same
    size (genjax uses 1,000 samples against 128 features).

    Raises:
      ValueError: ``features`` not 2-D, fewer than 2 samples, or non-finite values.
    """
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must have shape (N, F) with N >= 2, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features hold non-finite values")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix, from its
    eigendecomposition (``scipy.linalg.eigh``); rounding's tiny negative eigenvalues are
    taken as 0, so the result is real and finite."""
    import scipy.linalg  # (here: 0.2 s of every image experiment's start otherwise)

    values, vectors = scipy.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mean1, cov1, mean2, cov2) -> float:
    """The Frechet (2-Wasserstein squared) distance between N(mean1, cov1) and
    N(mean2, cov2):

        ||mean1 - mean2||^2 + tr(cov1 + cov2 - 2 (cov1^(1/2) cov2 cov1^(1/2))^(1/2))

    The trace term equals FID's tr((cov1 cov2)^(1/2)) (the two products have the same
    eigenvalues), but the matrix under the root here is symmetric positive semi-definite,
    so its root is real and finite for any covariances, singular ones included: no
    complex parts to drop, no offset added.

    Args:
      mean1, mean2: (F,) means; cov1, cov2: (F, F) covariances (float64 is used).

    Returns:
      The distance, a float >= 0.

    Raises:
      ValueError: shapes that do not match.
    """
    m1, m2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
    s1 = np.atleast_2d(np.asarray(cov1, np.float64))
    s2 = np.atleast_2d(np.asarray(cov2, np.float64))
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.size, m1.size):
        raise ValueError(f"means {m1.shape}, {m2.shape} and covariances {s1.shape}, {s2.shape} "
                         "do not match")
    root1 = _psd_sqrt(s1)
    cross = _psd_sqrt(root1 @ s2 @ root1)
    distance = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(cross)
    return max(0.0, float(distance))  # rounding can leave -1e-9 for equal distributions


def _check_probabilities(probs) -> np.ndarray:
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"class probabilities must have shape (N, K) with N >= 1, got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError("class probabilities must be finite, non-negative rows summing to 1")
    return p


def inception_score(probs) -> float:
    """exp(mean over samples of KL(p(y|x) || p(y))), p(y) the mean of the rows; in [1, K].

    Args:
      probs: (N, K) class probabilities p(y|x) of N samples.

    Raises:
      ValueError: not (N, K) rows of probabilities.
    """
    p = _check_probabilities(probs)
    # Sums over samples with math.fsum (exactly rounded): the score does not depend on
    # the samples' order, to the last bit.
    marginal = np.array([math.fsum(column) for column in p.T]) / len(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(marginal)), 0.0)
    return float(np.exp(math.fsum(terms.sum(axis=1)) / len(p)))


def class_coverage(probs) -> dict:
    """The histogram of the samples' most likely classes: ``classes_covered`` (int, how
    many classes at least one sample falls in) and ``class_entropy`` (nats; ln K = 2.3026
    for K = 10 when they fall evenly, 0 when all fall in one).

    Args:
      probs: (N, K) class probabilities (or logits: only the argmax is used).
    """
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"class probabilities must have shape (N, K) with N >= 1, got {p.shape}")
    counts = np.bincount(np.argmax(p, axis=1), minlength=p.shape[1])
    share = counts[counts > 0] / counts.sum()
    return {"classes_covered": int((counts > 0).sum()),
            "class_entropy": float(-(share * np.log(share)).sum()) + 0.0}  # never -0.0
