"""FID and KID against closed forms on Gaussian features."""

import numpy as np
import pytest

from jaxseg import image_quality as iq


def test_frechet_distance_of_diagonal_gaussians_has_its_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  s1, s2 = rng.uniform(0.2, 3, 6), rng.uniform(0.2, 3, 6)
  # Commuting (diagonal) covariances: Tr((S1 S2)^1/2) = sum sqrt(s1 s2).
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  assert iq.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_of_rotated_gaussians():
  # S2 = R S1 R^T has the same spectrum; with equal means, FID = 2 Tr(S) - 2 Tr((S1 S2)^1/2).
  rng = np.random.default_rng(1)
  a = rng.normal(size=(4, 4))
  s1 = a @ a.T + np.eye(4)
  q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  s2 = q @ s1 @ q.T
  from scipy import linalg
  want = 2 * np.trace(s1) - 2 * np.trace(np.real(linalg.sqrtm(s1 @ s2)))
  assert iq.frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(want, rel=1e-7)
  assert iq.frechet_distance(np.zeros(4), s1, np.zeros(4), s1) == pytest.approx(0, abs=1e-7)


def test_fid_of_samples_approaches_the_closed_form():
  rng = np.random.default_rng(2)
  a = rng.normal(0.0, 1.0, (20000, 3))
  b = rng.normal(0.5, 2.0, (20000, 3))
  want = 3 * 0.5 ** 2 + 3 * (1 - 2) ** 2
  assert iq.fid(a, b) == pytest.approx(want, rel=0.03)


def test_kid_is_unbiased_for_one_dimensional_gaussians():
  # d = 1: k(x, y) = (xy + 1)^3 = x^3 y^3 + 3 x^2 y^2 + 3 xy + 1, so MMD^2 follows from the
  # raw moments of each Gaussian.
  def moments(mu, s):
    return mu, mu ** 2 + s ** 2, mu ** 3 + 3 * mu * s ** 2

  def k(p, q):
    return p[2] * q[2] + 3 * p[1] * q[1] + 3 * p[0] * q[0] + 1

  p, q = moments(0.3, 1.0), moments(-0.2, 0.7)
  want = k(p, p) + k(q, q) - 2 * k(p, q)
  rng = np.random.default_rng(3)
  a, b = rng.normal(0.3, 1.0, (50000, 1)), rng.normal(-0.2, 0.7, (50000, 1))
  mean, std = iq.kid(a, b, subsets=200, subset_size=500)
  assert mean == pytest.approx(want, abs=3 * std / np.sqrt(200) + 0.02 * want)
  # Same distribution: zero in expectation (the estimate can be negative).
  same, same_std = iq.kid(a, rng.normal(0.3, 1.0, (50000, 1)), subsets=200, subset_size=500)
  assert abs(same) < 3 * same_std / np.sqrt(200) + 1e-3


def test_bad_feature_sets_are_one_line():
  with pytest.raises(iq.JaxsegError, match=r"same D; got \(3, 2\) and \(3, 4\)"):
    iq.fid(np.zeros((3, 2)), np.zeros((3, 4)))
