"""Corpus preparation: the RWKV World tokenizer and packing documents into binidx shards."""
