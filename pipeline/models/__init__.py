"""Networks: backbones (ViTs, CNNs) by name, and the loaders of their checkpoints."""

from pipeline.models.backbones import Backbone, BackboneOutput, create_backbone, list_backbones, register_backbone

__all__ = ["Backbone", "BackboneOutput", "create_backbone", "list_backbones", "register_backbone"]
