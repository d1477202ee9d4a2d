"""Q-DISTILL chest X-ray triage: teacher and student Q-Formers native to Hugging Face transformers."""

__version__ = "0.1.0"
