"""Import a UniSeg reference-code checkpoint as our model folder (`python -m pipeline.import_reference`)."""
