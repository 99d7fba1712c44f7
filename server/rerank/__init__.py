"""Cross-encoder rerank: the ONNX scorer (`cross_encoder`) and the budget-aware selection (`budget`)."""
