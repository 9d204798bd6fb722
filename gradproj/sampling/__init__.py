"""Layerwise sampling (LISA, OwLore): which blocks train, and the outlier ratios that weight the draw.

The one-call OwLore setup, :func:`gradproj.owlore`, lives in :mod:`gradproj.sampling.owlore` (it builds an
optimizer, so it is imported from the package root rather than here, to keep ``optimizers`` importable
from this package).
"""

from .outliers import block_linears, decoder_blocks, input_feature_norms, outlier_ratios
from .sampler import LayerSampler

__all__ = ["LayerSampler", "block_linears", "decoder_blocks", "input_feature_norms", "outlier_ratios"]
