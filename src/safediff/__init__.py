"""safediff: make text-to-image diffusion models safe, and prove it."""

__version__ = "0.1.0"
