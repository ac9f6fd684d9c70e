"""tre_lightning.quickstart"""
