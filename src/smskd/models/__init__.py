"""Model zoo: plain ``nn.Module``s whose features are reached by taps."""

from smskd.models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
