"""tre_lightning.ppo"""
