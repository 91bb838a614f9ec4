"""Model bundles (a directory in Hugging Face Optimum's ONNX layout) and the batch classifier."""

from worker.model.bundle import Bundle, RouteTable, default_bundle_path, load_bundle
from worker.model.classifier import Classifier, Prediction

__all__ = ["Bundle", "Classifier", "Prediction", "RouteTable", "default_bundle_path", "load_bundle"]
