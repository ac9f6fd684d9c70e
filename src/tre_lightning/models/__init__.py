"""tre_lightning.models"""
