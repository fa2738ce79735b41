"""Training stage: `python -m pipeline.train --config FILE` (see `__main__`).

- `run`: the driver (Ray local or cluster, run folder and record, MLflow run, TorchTrainer,
  final model registration);
- `loop`: `train_fn_per_worker`, run by Ray Train on every rank;
- `sampling`: task samplers (balanced, proportional, temperature) with checkpointable state;
- `data`: the batch stream (store patches, foreground oversampling, nnU-Net augmentation);
- `augment`: nnU-Net v2's spatial and intensity augmentation, drawn from a generator, applied
  with torch ops in the loader or on the training device (`train.augment_on`);
- `loss`, `optim`: Dice + CE with deep supervision (batch Dice gathered over DDP ranks);
  optimizers and lr schedules by name;
- `validation`: per-task, per-class Dice on the stores' validation splits;
- `checkpoint`, `build`, `tracking`: checkpoints (model folder + train state), config-to-network
  and model card, MLflow logging and plots;
- `finetune`: transfer of a trained universal model to a new task.
"""
