"""Text-to-image models in one internal convention (`T2IModel`), loaders and the offline tiny SD."""

from safediff.models.base import T2IModel

__all__ = ["T2IModel"]
