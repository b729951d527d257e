"""Transport-agnostic pieces of the v1 API: schema, auth, images, encoding, storage."""
