"""HTTP server that scores chat conversations with reward models on vLLM."""
