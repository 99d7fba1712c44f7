"""Retrieval: tokenizer, sparse (BM25) retriever, metadata filters."""
