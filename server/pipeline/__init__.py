"""The request path: one Budget per request, one Stage contract, and the pipelines built from them."""
