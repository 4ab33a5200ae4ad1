"""RWKV-4/5/6 pretraining: plain PyTorch models, fused WKV ops and the trainer around them.

Kept free of heavy imports so `python -m rwkv_train.<tool>` starts fast and so that
data_prep can find the shipped configs without importing torch.
"""
