"""The `datasets` builder, the synthetic film generator and the frozen-feature cache."""
