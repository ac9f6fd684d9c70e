"""tre_lightning.rollout"""
