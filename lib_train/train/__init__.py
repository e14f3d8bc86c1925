"""Training pieces: noise and loss (``loss``), optimizers (``optim``), learning-rate schedules (``schedule``)."""
