"""Training: the recipe's schedule, the loop, run state and directories, data parallelism."""
