"""The captioning model: towers, heads, tokenizer and presets."""

from capcli.model.captioner import Captioner, CaptionerConfig
from capcli.model.presets import build_model

__all__ = ["Captioner", "CaptionerConfig", "build_model"]
