"""Pre/post-processing, metric scaling, weights and the model cache."""
