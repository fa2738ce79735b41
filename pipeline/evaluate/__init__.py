"""Evaluation of a model on the stores' split: Dice and HD95 per task and class (`python -m pipeline.evaluate`)."""
