"""RWKV-4, RWKV-5 (Eagle) and RWKV-6 (Finch) as plain PyTorch modules.

    from rwkv_train.model import RWKV, RWKVConfig
    model = RWKV(RWKVConfig(version=6, n_layer=2, n_embd=128))
    logits = model(idx)                                   # (B, T, V)
    logits, state = model.forward_with_state(idx, model.init_state(B))

Nothing here imports Lightning, DeepSpeed or torch.distributed: parallelism, precision and
checkpointing are applied from outside (the LightningModule).
"""

from rwkv_train.model.config import RWKVConfig
from rwkv_train.model.rwkv import RWKV, State

__all__ = ["RWKV", "RWKVConfig", "State"]
