"""HQ-CLIP offline job: data, losses, open_clip models, training, evaluation, export to the model repository."""
