"""Loaders, chunking, embedding and versioned Milvus knowledge stores."""
