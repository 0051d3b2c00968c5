"""The AI gateway: upstream providers, the model router and its shared state."""
