"""Sample-quality metrics (genjax/metrics) and the MNIST classifier behind them."""

import json
import math

import numpy as np
import pytest
import scipy.linalg

from genjax.metrics import class_coverage, feature_statistics, frechet_distance, inception_score
from genjax.metrics.mnist import SampleQuality, TrainedClassifier


def random_covariance(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + (2 - 3) ** 2)
    # Diagonal covariances: sum over dimensions of the 1-D distances.
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected)
    # General covariances that do not commute: FID's formula with scipy's sqrtm.
    rng = np.random.default_rng(0)
    s1, s2 = random_covariance(rng, 6), random_covariance(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    fid = (np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2)
           - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fid, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu1, s1, mu2[:5], s2[:5, :5])


def test_frechet_distance_of_samples_approaches_the_closed_form():
    rng = np.random.default_rng(1)
    s1, s2 = random_covariance(rng, 4), random_covariance(rng, 4)
    mu1, mu2 = np.zeros(4), np.full(4, 0.5)
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    estimate = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert estimate == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=0.02)


def test_fewer_samples_than_features_stay_real_and_finite():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 1.0  # rank <= 9 of 64
    mean1, cov1 = feature_statistics(x)
    assert np.linalg.matrix_rank(cov1) == 9
    d = frechet_distance(mean1, cov1, *feature_statistics(y))
    assert np.isfinite(d) and isinstance(d, float) and d > 0
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(x[:1])


def test_inception_score_and_coverage():
    eye = np.eye(10)
    spread = eye[np.arange(1000) % 10]          # confident, every class equally often
    assert inception_score(spread) == pytest.approx(10.0)
    assert class_coverage(spread) == {"classes_covered": 10,
                                      "class_entropy": pytest.approx(math.log(10))}
    one_digit = eye[np.full(1000, 7)]           # every sample the same digit
    assert inception_score(one_digit) == pytest.approx(1.0)
    assert class_coverage(one_digit) == {"classes_covered": 1, "class_entropy": 0.0}
    assert inception_score(np.full((50, 10), 0.1)) == pytest.approx(1.0)  # unsure of all
    probs = np.random.default_rng(3).dirichlet(np.full(10, 0.3), size=500)
    order = np.random.default_rng(4).permutation(500)
    assert inception_score(probs[order]) == inception_score(probs)
    assert class_coverage(probs[order]) == class_coverage(probs)
    with pytest.raises(ValueError, match="summing to 1"):
        inception_score(np.full((3, 10), 0.5))


def test_real_halves_are_close_and_noise_is_far(mnist_dir, tmp_path):
    # A small classifier trained here on the real offline split: the two halves of the
    # held-out images are near each other, real against uniform noise or one digit is far.
    from genjax.data.mnist import load_mnist
    from genjax.models.classifier import ClassifierConfig
    from genjax.tasks.classifier import make_task
    from genjax.train.loop import fit
    from helpers import tiny_train_config

    data = load_mnist(mnist_dir, log=lambda s: None)
    config = ClassifierConfig(features=(8, 16), hidden=32, dropout=0.0)
    cfg = tiny_train_config(max_iters=150, eval_interval=150, batch_size=64,
                            learning_rate=3e-3, parallel="none")
    result = fit(make_task(config, data, 64), cfg, tmp_path / "run", progress=False)
    assert result.history[-1]["test_accuracy"] > 0.85
    classifier = TrainedClassifier(config, result.engine.to_single_device(result.state.params),
                                   {}, tmp_path)
    held_out = data.test_images
    halves = SampleQuality(classifier, held_out[:500])(held_out[500:])
    noise = SampleQuality(classifier, held_out[:500])(
        np.random.default_rng(0).uniform(0, 1, (500, 28, 28, 1)).astype(np.float32))
    digit_one = data.train_images[data.train_labels == 1][:500]
    ones = SampleQuality(classifier, held_out[:500])(digit_one)
    assert halves["frechet_distance"] * 10 < noise["frechet_distance"], (halves, noise)
    assert halves["frechet_distance"] * 3 < ones["frechet_distance"], (halves, ones)
    assert halves["classes_covered"] == 10 and ones["class_entropy"] < 0.5 < halves["class_entropy"]
    assert halves["inception_score"] > 5 > ones["inception_score"]
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        classifier.outputs(held_out[:4] * 2 - 1)


def test_trained_classifier_round_trip(digits_dir, digits_classifier, capsys):
    from experiments import mnist_classifier

    classifier = TrainedClassifier.load(digits_classifier)
    record = json.loads((digits_classifier / "classifier.json").read_text())
    assert classifier.accuracy == record["accuracy"] >= 0.9
    assert record["heldout_images"] == 20 and record["split_name"] == "mnist-test-split"
    assert (digits_classifier / "loss.png").stat().st_size > 5000  # as every experiment's run
    assert set(record["real"]) == {"n_samples", "frechet_distance", "inception_score",
                                   "classes_covered", "class_entropy"}
    features, probs = classifier.outputs(np.zeros((3, 28, 28, 1), np.float32))
    assert features.shape == (3, 128) and features.dtype == np.float64
    np.testing.assert_allclose(probs.sum(1), 1.0)
    # A directory that holds a trained classifier is left as it is.
    before = {p: p.stat().st_mtime_ns for p in digits_classifier.rglob("*")}
    again = mnist_classifier.main(["--data-dir", str(digits_dir), "--run-dir",
                                   str(digits_classifier)])
    assert again == record and "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in digits_classifier.rglob("*")} == before


def test_vae_reports_sample_quality_of_prior_samples(digits_dir, digits_classifier, tmp_path):
    from experiments import vae_mnist

    run = tmp_path / "run"
    vae_mnist.main(["--data-dir", str(digits_dir), "--run-dir", str(run), "--max-iters", "2",
                    "--eval-interval", "2", "--batch-size", "16", "--warmup-iters", "1",
                    "--iwae-k", "2", "--parallel", "none", "--classifier", str(digits_classifier)])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert {"frechet_distance", "inception_score", "classes_covered", "class_entropy",
                "neg_elbo"} <= set(r)
    assert json.loads((run / "config.json").read_text())["classifier"] == str(digits_classifier)
