"""Hearth trainer: data pipeline, pretraining, SFT, LoRA, distributed; also the `hearth` CLI."""
