"""Lightning callbacks for training diagnostics (installed as ``tre_lightning.callbacks``)."""
