"""Data: the Example record, chat/Alpaca formatting, tokenisation with label masks, sources."""
