"""The model side: the model-family table (:mod:`.families`, with the text-encoder kinds of :mod:`.text_encoders`),
architecture specs, offline ldm builder, checkpoint loading, the model bundle the trainer uses."""
