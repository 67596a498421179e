"""Sample-quality metrics of generated images: FID (Heusel et al. 2017) and KID (Binkowski et
al. 2018) from features of a pluggable network.

Both compare feature sets (N, D) of real and generated images; which network gives the
features decides what the numbers mean, so every report names it. FID is the Frechet distance
between Gaussians fitted to the two sets; KID is the unbiased MMD^2 with the cubic polynomial
kernel k(x, y) = (x.y / D + 1)^3, averaged over random subsets (unbiased even for small sets,
where FID is biased upwards).
"""

from __future__ import annotations

import numpy as np

from jaxseg.errors import JaxsegError


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) of two Gaussians (float64)."""
  from scipy import linalg  # pylint: disable=g-import-not-at-top
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    # A singular product (fewer samples than dimensions): regularise as pytorch-fid does.
    offset = np.eye(len(mu1)) * 1e-6
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  covmean = np.real(covmean)  # sqrtm leaves tiny imaginary parts from rounding
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _check(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise JaxsegError(f"feature sets must be (N, D) with the same D; got {a.shape} and "
                      f"{b.shape}")
  if len(a) < 2 or len(b) < 2:
    raise JaxsegError("FID/KID need at least 2 images per set")
  return a, b


def fid(features_a, features_b) -> float:
  """FID between two feature sets (N, D)."""
  a, b = _check(features_a, features_b)
  return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                          np.cov(b, rowvar=False))


def kid(features_a, features_b, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
  """(mean, std) over `subsets` random subsets of the unbiased MMD^2 with the cubic kernel."""
  a, b = _check(features_a, features_b)
  m = min(subset_size, len(a), len(b))
  d = a.shape[1]
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(subsets):
    x = a[rng.choice(len(a), m, replace=False)]
    y = b[rng.choice(len(b), m, replace=False)]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    # U-statistics: the diagonals (a sample with itself) are left out.
    values.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                  + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
  return float(np.mean(values)), float(np.std(values))


class _Features:
  """Features of uint8 images (N, H, W, 3), computed in batches: float32 (N, D)."""
  name: str
  batch_size: int
  _apply = None

  def __call__(self, images_uint8) -> np.ndarray:
    return np.concatenate([np.asarray(self._apply(images_uint8[i:i + self.batch_size]))
                           for i in range(0, len(images_uint8), self.batch_size)])


class RandomConvFeatures(_Features):
  """The fallback feature network: four strided 3x3 convolutions with ReLU, weights drawn from
  a fixed seed, the global means of every layer concatenated (480 features).

  Random convolutional features separate image statistics surprisingly well, but the numbers
  are not Inception FIDs and compare only with other figures from this same network; every
  report says which network it used (`name`).
  """

  name = "random-convnet-v1 (seed 0; not Inception: compare only with the same network)"

  def __init__(self, seed: int = 0, batch_size: int = 64):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    class Net(nn.Module):

      @nn.compact
      def __call__(self, x):
        pooled = []
        for width in (32, 64, 128, 256):
          x = nn.relu(nn.Conv(width, (3, 3), strides=2,
                              kernel_init=nn.initializers.he_normal())(x))
          pooled.append(jnp.mean(x, axis=(1, 2)))
        return jnp.concatenate(pooled, -1)

    net = Net()
    variables = net.init(jax.random.key(seed), jnp.zeros((1, 64, 64, 3)))
    self._apply = jax.jit(lambda images: net.apply(
        variables, images.astype(jnp.float32) / 127.5 - 1.0))
    self.batch_size = batch_size


class BackboneFeatures(_Features):
  """Globally pooled final features of a converted ImageNet backbone (`python -m
  jaxseg.weights.convert`): Inception-v3 (2048 features of mixed10, images resized to 299x299
  as FID does), or e.g. ResNet-50 (2048, at the images' own size). A trained network, as FID
  intends, where a user has the weights."""

  # Networks with a fixed input size: images are resized (bilinear) to it.
  INPUT_SIZE = {"inception_v3": 299}

  def __init__(self, directory: str, batch_size: int = 32):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from jaxseg import weights  # pylint: disable=g-import-not-at-top
    module, variables, preprocess = weights.load_backbone(directory)
    metadata = weights.read_metadata(directory)
    size = self.INPUT_SIZE.get(metadata["backbone"])
    self.name = (f"{metadata['source']} {metadata['arch']} (pooled stage4"
                 f"{f', at {size}x{size}' if size else ''}, {directory})")

    def apply(images):
      images = images.astype(jnp.float32)
      if size:
        # Without antialiasing, like the TF bilinear resize of the FID code, also when
        # shrinking.
        images = jax.image.resize(images, (images.shape[0], size, size, 3), "bilinear",
                                  antialias=False)
      stage4 = module.apply(variables, preprocess(images), train=False)["stage4"]
      return jnp.mean(stage4.astype(jnp.float32), axis=(1, 2))

    self._apply = jax.jit(apply)
    self.batch_size = batch_size


def feature_network(spec: str):
  """"random" (the fallback) or the directory of a converted backbone."""
  return RandomConvFeatures() if spec in ("", "random") else BackboneFeatures(spec)
