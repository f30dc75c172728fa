"""distill: config-driven distillation of a large text-embedding teacher into a small student."""

__version__ = "0.1.0"
