"""Small, real models and datasets that work offline on any machine (used by configs/ and tests)."""
