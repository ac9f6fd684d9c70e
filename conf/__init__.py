"""Packaged Hydra configs (installed as ``tre_lightning.conf``); search path ``pkg://tre_lightning.conf``."""
