"""Dual encoders built through open_clip, and the model folders they are saved in."""

from clipkit.models.factory import ModelBundle, bundle_from_config, create_model, list_architectures
from clipkit.models.io import load_model, save_model

__all__ = ["ModelBundle", "bundle_from_config", "create_model", "list_architectures", "load_model", "save_model"]
