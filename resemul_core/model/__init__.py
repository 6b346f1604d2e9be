"""The model: the paper's blocks, the sample-level CNN, checkpoints, the Keras import."""
