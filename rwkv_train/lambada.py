"""LAMBADA, last-word prediction: the zero-shot figure RWKV papers report first, a cheap check of
a pretraining run beside its val loss (`python -m rwkv_train.evaluate ... --lambada FILE`).

Each passage is split at its last space. The model reads token 0, which precedes every
document in training (the previous document's end), then the context, and is scored on the
tokens of " " + the last word. The figures are the ones the RWKV evaluation scripts print:
`lambada/ppl` is exp(-mean over passages of the word's log-probability), a perplexity per
word rather than per token, and `lambada/acc` is the share of passages in which the model's
top choice is right at every token of the word. The file is OpenAI's `lambada_test.jsonl`
(5153 passages, one {"text": ...} per line), which you bring: nothing is downloaded.
"""

import json
import math
from pathlib import Path

import torch
from torch import nn

from data_prep.tokenizer import WorldTokenizer

Item = tuple[list[int], list[int]]  # (token 0 + context ids, last-word ids)


def read_passages(path: str | Path) -> list[tuple[str, str]]:
    """(context, " " + last word) of every line; ValueError naming the line of a bad one."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                expected = 'expected a JSON object with a "text" string'
                raise ValueError(f"{path}:{n}: {expected}") from None
            context, space, word = str(text).rpartition(" ")
            if not space or not context or not word:
                raise ValueError(f"{path}:{n}: no last word after a space to predict")
            out.append((context, " " + word))
    if not out:
        raise ValueError(f"{path}: no passages")
    return out


def encode(passages: list[tuple[str, str]], tokenizer: WorldTokenizer | None = None) -> list[Item]:
    """Token ids of each (context, word), the context after token 0."""
    tok = tokenizer or WorldTokenizer()
    return [([0, *tok.encode(context)], tok.encode(word)) for context, word in passages]


@torch.no_grad()
def score(net: nn.Module, items: list[Item], batch_size: int = 8) -> dict[str, float]:
    """`lambada/ppl` and `lambada/acc` of `net` (token ids (B, T) -> logits (B, T, V)) on
    `items`. Passages of similar length are batched, padded on the right: the model is causal,
    so what follows a passage cannot change its scores."""
    device = next(net.parameters()).device
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    log_prob_sum, correct = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = [items[i] for i in order[start : start + batch_size]]
        width = max(len(ctx) + len(word) for ctx, word in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (ctx, word) in enumerate(batch):
            x[row, : len(ctx) + len(word)] = torch.tensor(ctx + word)
        with autocast:
            logits = net(x.to(device))
        for row, (ctx, word) in enumerate(batch):
            # the logits at position p predict token p + 1
            at = logits[row, len(ctx) - 1 : len(ctx) + len(word) - 1].float()
            target = torch.tensor(word, device=device)
            log_probs = torch.log_softmax(at, dim=-1).gather(1, target[:, None])
            log_prob_sum += log_probs.sum().item()
            correct += bool((at.argmax(dim=-1) == target).all())
    return {
        "lambada/ppl": math.exp(-log_prob_sum / len(items)),
        "lambada/acc": correct / len(items),
    }
