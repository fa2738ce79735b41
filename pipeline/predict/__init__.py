"""Prediction on raw NIfTI scans with a registered model (`python -m pipeline.predict`)."""
