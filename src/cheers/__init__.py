"""Cheers: one model for image understanding, text-to-image generation, editing and chat."""

__version__ = "0.1.0"
