"""The built-in model organism: a synthetic world, its tokenizer, a tiny pretrained Llama, an exact judge."""
