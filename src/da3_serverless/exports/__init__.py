"""Files made from a prediction, one module per format (scene point clouds, GLB, COLMAP, float
maps, 3DGS PLY): pure functions of the prediction, the upright input pixels and the request's
options."""
