"""Observability: Prometheus metrics (`metrics`), structured and PII-redacted logs (`logs`), and optional
OpenTelemetry spans (`tracing`, never imported from opentelemetry unless [observability] tracing = true)."""
