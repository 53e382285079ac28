"""Serving the embedder over gRPC with TF Serving's protocol: `server` (a TF-Serving-compatible server) and `client`."""
