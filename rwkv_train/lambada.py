"""LAMBADA, last-word prediction: the zero-shot figure RWKV papers report first, a cheap check of
a pretraining run beside its val loss: at every validation with `data.lambada_path`, or
afterwards with `python -m rwkv_train.evaluate ... --lambada FILE`.

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
from torch import Tensor, nn
from torch.utils.data import Dataset

from data_prep.tokenizer import WorldTokenizer
from rwkv_train.data.dataset import rank_slice

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


def largest_id(items: list[Item]) -> int:
    """The largest token id of the passages: a model needs a vocabulary above it."""
    return max(max(ctx + word) for ctx, word in items)


def collate(items: list[Item]) -> tuple[Tensor, Tensor]:
    """A batch of passages padded on the right with 0: token ids x (B, T), and targets (B, T),
    the word token each position's logits must predict, -1 where there is none. The model is
    causal, so the padding after a passage cannot change its scores."""
    width = max(len(ctx) + len(word) for ctx, word in items)
    x = torch.zeros(len(items), width, dtype=torch.long)
    targets = torch.full((len(items), width), -1, dtype=torch.long)
    for row, (ctx, word) in enumerate(items):
        x[row, : len(ctx) + len(word)] = torch.tensor(ctx + word)
        # the logits at position p predict token p + 1
        targets[row, len(ctx) - 1 : len(ctx) + len(word) - 1] = torch.tensor(word)
    return x, targets


def passage_scores(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per passage of a batch: the log-probability of its word (float64) and whether the top
    choice was right at every word token (bool). Only the word positions are normalised."""
    word = targets.ge(0)
    rows = word.nonzero()[:, 0]
    at = logits[word].float()  # (word tokens in the batch, V)
    wanted = targets[word]
    log_probs = torch.log_softmax(at, dim=-1).gather(1, wanted[:, None])[:, 0].double()
    misses = at.argmax(dim=-1).ne(wanted).double()
    zeros = torch.zeros(len(targets), dtype=torch.float64, device=logits.device)
    return zeros.index_add(0, rows, log_probs), zeros.index_add(0, rows, misses).eq(0)


def metrics(log_prob_sum: float, correct: float, passages: float) -> dict[str, float]:
    """`lambada/ppl` and `lambada/acc` from the sums over passages."""
    return {
        "lambada/ppl": math.exp(-log_prob_sum / passages),
        "lambada/acc": correct / passages,
    }


@torch.no_grad()
def score(net: nn.Module, items: list[Item], batch_size: int = 8) -> dict[str, float]:
    """`lambada/ppl` and `lambada/acc` of `net` (token ids (B, T) -> logits (B, T, V)) on
    `items`, in batches of passages of similar length."""
    device = next(net.parameters()).device
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    ordered = sorted(items, key=lambda item: len(item[0]) + len(item[1]))
    log_prob_sum, correct = 0.0, 0
    for start in range(0, len(ordered), batch_size):
        x, targets = collate(ordered[start : start + batch_size])
        with autocast:
            logits = net(x.to(device))
        log_prob, right = passage_scores(logits, targets.to(device))
        log_prob_sum += log_prob.sum().item()
        correct += int(right.sum())
    return metrics(log_prob_sum, correct, len(items))


class RankPassages(Dataset):
    """One rank's passages for validation during training (`data.lambada_path`): sorted by
    length so batches pad little, rank r of `world` takes every world-th, and a rank with
    fewer than the others repeats a passage at weight 0 (`rank_slice`)."""

    def __init__(self, items: list[Item], rank: int = 0, world: int = 1) -> None:
        ordered = [(item, 1.0) for item in sorted(items, key=lambda it: len(it[0]) + len(it[1]))]
        self.rows = rank_slice(ordered, rank, world, (ordered[0][0], 0.0))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Item, float]:
        return self.rows[i]


def collate_rows(rows: list[tuple[Item, float]]) -> dict[str, Tensor]:
    """A DataLoader batch of `RankPassages`: `collate`'s x and targets, and the weights."""
    x, targets = collate([item for item, _ in rows])
    weight = torch.tensor([w for _, w in rows], dtype=torch.float64)
    return {"x": x, "targets": targets, "weight": weight}
