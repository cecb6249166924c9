"""The embedder: the Faust worker, chunking, the encoder engine, and the vector index writer."""
