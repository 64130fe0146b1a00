"""BERT family (placeholder until the encoder lands)."""
