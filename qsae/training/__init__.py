"""Training SAEs: recipes, the training loop, run state and checkpoints, and trained layers in the run directory."""
