"""Fine-tune a trained universal model on a new task (`python -m pipeline.finetune`)."""
