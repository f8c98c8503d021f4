"""MTA distillation: linguistic units, layer plan, losses and a Hugging Face trainer."""

__version__ = "0.1.0"
