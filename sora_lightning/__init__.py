"""sora_lightning: train Sora-style text-to-video models, from one CPU to SLURM clusters."""

__version__ = "0.1.0"
