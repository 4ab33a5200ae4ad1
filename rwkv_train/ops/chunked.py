"""Chunked PyTorch WKV (placeholder: delegates to the recurrence until the chunked form lands)."""

from rwkv_train.ops.reference import wkv4_reference as wkv4_chunked
from rwkv_train.ops.reference import wkv5_reference as wkv5_chunked
from rwkv_train.ops.reference import wkv6_reference as wkv6_chunked

__all__ = ["wkv4_chunked", "wkv5_chunked", "wkv6_chunked"]
