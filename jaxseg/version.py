"""The jaxseg release (its own module, so that any layer can say which wrote a file)."""

__version__ = "0.1.0"
