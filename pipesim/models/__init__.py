"""Models: catalog of shapes, a torch Llama-family decoder for pipelines, GGUF loading, tokenizer."""
