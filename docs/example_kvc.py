"""Rebuild the worked example of docs/FORMAT.md and print its bytes."""

import struct

import torch

import kvc
from kvc.runtime.kv import ContextKV, LayerKV

key = torch.tensor([[[1.0, -2.0], [0.5, 0.25], [3.0, 0.0]]], dtype=torch.float16)
value = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]], dtype=torch.float16)
data = kvc.encode_kv(ContextKV([42, 7, 9], [LayerKV(key, value)]), {"name": "example"}, chunk_tokens=2, prefill_info={})
_, major, minor, length = struct.unpack("<8sHHI", data[:16])
print(f"{len(data)} bytes, format {major}.{minor}, header {length} bytes")
print(data[:16].hex(" "))
print(data[16 : 16 + length].decode())
print(data[16 + length : 48 + length].hex())
print(data[48 + length :].hex(" "))
