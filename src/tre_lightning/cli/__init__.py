"""Entry points: ``tre-train`` (Hydra), ``tre-lightning`` (Lightning CLI), ``tre-eval``, ``tre-plot``,
``tre-train-rm``; both training entry points build their objects with :mod:`.build`."""
