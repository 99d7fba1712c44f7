"""Answer generators: one streaming interface (base.Generator), one module per backend."""
