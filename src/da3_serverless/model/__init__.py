"""Pure-torch Depth Anything 3 networks: tensors in, tensors out."""
