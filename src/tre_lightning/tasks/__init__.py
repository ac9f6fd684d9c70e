"""tre_lightning.tasks"""
