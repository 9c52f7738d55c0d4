"""The pretraining driver: setup, step, logging, checkpoint state, the loop."""
