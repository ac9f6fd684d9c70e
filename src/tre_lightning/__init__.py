"""tre-lightning: PPO for language models on PyTorch Lightning with pluggable
exploration regularizers, first of all Trust Region Entropy (TRE-K, TRE-P).

The sub-packages are imported lazily by their users; importing the top-level
package stays cheap (no transformers or Lightning import).
"""

__version__ = "0.1.0"
