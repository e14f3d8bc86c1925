"""The model side: architecture specs, offline ldm builder, checkpoint loading, the model bundle the trainer uses."""
