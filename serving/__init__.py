"""Serving the embedder with TF Serving's protocols: `export` (the SavedModel), `server` (a TF-Serving-compatible gRPC
server), `rest` (TF Serving's REST API on that server) and `client` (`connect(address, model)`: a gRPC or REST client)."""
