"""Using and sharing a trained model: the model card and the worklist CLI (`qdistill-triage`)."""
