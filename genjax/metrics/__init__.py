"""Sample-quality metrics of generated images (used by the GAN and the VAE).

:mod:`genjax.metrics.sample_quality`: the Frechet distance of feature statistics, the
Inception Score and class coverage, from any classifier's outputs (NumPy/SciPy, float64).
:mod:`genjax.metrics.mnist`: genjax's trained MNIST classifier as their feature extractor
(``python -m experiments.mnist_classifier`` trains it once).
"""

from genjax.metrics.sample_quality import (class_coverage, feature_statistics,
                                           frechet_distance, inception_score)

__all__ = ["class_coverage", "feature_statistics", "frechet_distance", "inception_score"]
