"""Queries are cut at `query_max_length` tokens, so a pathological query cannot eat the retrieval budget."""

from __future__ import annotations

import numpy as np

from server.config import Config
from server.retrieval.encoder import OnnxEncoder


def test_long_query_is_truncated_to_query_max_length(config: Config) -> None:
    folder = config.resolve_path(config.retrieval.dense.model_dir)
    enc = OnnxEncoder.load(folder, query_max_length=8)
    full = OnnxEncoder.load(folder)
    long = "reset the smart plug now because the light keeps blinking orange all night long"
    # [CLS] + 6 word pieces + [SEP] = 8 tokens: what the cut query sees.
    np.testing.assert_allclose(enc.encode_query(long), full.encode_query("reset the smart plug now because"),
                               atol=1e-5)
    assert not np.allclose(full.encode_query(long), enc.encode_query(long), atol=1e-3)
    # passages keep the index-time limit
    assert enc.count_tokens(long) == full.count_tokens(long) > 8
