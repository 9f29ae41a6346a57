"""Search spaces over the engine's scaler and adaptation settings, as plain data."""
