"""The AMP engine: pure PyTorch (never imports Ray)."""
