"""Image operations in JAX that run inside jitted steps (SLIC superpixels)."""
