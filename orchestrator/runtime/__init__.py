"""Inside a rank's worker process: the entry point, TrainContext, reporting, checkpoint commits."""
