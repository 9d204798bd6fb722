"""Layerwise sampling (LISA, OwLore): which blocks train, and the outlier ratios that weight the draw.

The one-call OwLore setup, :func:`gradproj.owlore`, lives in :mod:`gradproj.sampling.owlore`. It builds an
optimizer, and the optimizers sit above this package (``ProjectedOptimizer`` steps a ``LayerSampler``), so
it imports them only when it is called: nothing in this package imports :mod:`gradproj.optimizers` at
import time. (It is not re-exported here, where its name would hide the module.)
"""

from .outliers import block_linears, decoder_blocks, input_feature_norms, outlier_ratios
from .sampler import LayerSampler

__all__ = ["LayerSampler", "block_linears", "decoder_blocks", "input_feature_norms", "outlier_ratios"]
