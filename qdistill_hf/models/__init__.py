"""The model files a Hub repo carries: configuration, modeling, loss, processing, tokenization."""
