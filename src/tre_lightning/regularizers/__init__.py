"""tre_lightning.regularizers"""
