"""Checkpoint conversion: CheXzero (OpenAI CLIP) to transformers' `CLIPVisionModel`."""
