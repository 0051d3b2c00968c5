"""The AI side: tokenizer, providers (model backends) and the model registry."""
