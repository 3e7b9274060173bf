"""Loading models and tokenizers (organism, local path or hub id), LoRA, merging, devices."""
