"""Sample-quality metrics: the Fréchet distance, k-NN precision/recall, the embedded digits sanity metric, and the
ImageNet metrics (FID, IS, precision/recall) through torch-fidelity (sar_fast.metrics.inception)."""
from .digits import digits_features, digits_metrics
from .frechet import feature_statistics, frechet_distance
from .knn_prc import knn_radii, precision_recall

__all__ = ["digits_features", "digits_metrics", "feature_statistics", "frechet_distance", "knn_radii",
           "precision_recall"]
