"""Segmentation and classification models (plain nn.Modules built from config dicts)."""

from .attention_unet import AttentionGate, AttentionUNet
from .classifier import LesionClassifier
from .improved_unet import ImprovedUNet
from .registry import MODELS, build_model
from .unet import UNet

__all__ = [
    "MODELS",
    "AttentionGate",
    "AttentionUNet",
    "ImprovedUNet",
    "LesionClassifier",
    "UNet",
    "build_model",
]
