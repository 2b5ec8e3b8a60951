"""Per-layer pooled embeddings, batched layer probes (LAET's layer scoring) and layer-aware embedding fusion.

* ``layer_embeddings``: one pooled vector per block and example, in one forward pass per batch.
* ``probe_layers`` / ``BatchedProbe``: a probe per layer, all trained at once.
* ``FusionClassifier``: one head over chosen layers of one model or of several.
"""
from .embeddings import LayerEmbeddings, fingerprint_texts
from .extract import layer_embeddings
from .fusion import FUSIONS, FusionClassifier
from .probes import PROBES, BatchedProbe, ProbeConfig, probe_layers

__all__ = [
    "FUSIONS", "PROBES", "BatchedProbe", "FusionClassifier", "LayerEmbeddings", "ProbeConfig",
    "fingerprint_texts", "layer_embeddings", "probe_layers",
]
