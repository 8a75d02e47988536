"""Quark checkpoints: safetensors I/O, per-architecture tensor names, the loader and the exporter."""

from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError, CheckpointReader, SafetensorsFile, save_file
