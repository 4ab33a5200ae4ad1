"""Sample text from a trained model in RNN mode.

    python -m rwkv_train.generate CKPT_OR_PTH prompt="Once upon a time" [max_tokens=200]
        [temperature=1.0] [top_p=0.85] [seed=0]

The prompt is read in one parallel pass that returns the recurrent state; then each new token
costs one step of the recurrence (constant time and memory per token, the point of RWKV).
Token 0 ends a document, so sampling stops there. Text is printed as it is decoded; a
character split across tokens appears once complete. Only ids the tokenizer has are sampled:
the model's 65536 outputs include six past the World vocabulary's last id (65529), which an
early model may still rank high. A model of the RWKV-4 Pile layout (vocabulary 50277) was
trained with another tokenizer and is refused, as is a prompt with ids the model lacks.

Sampling is nucleus (top-p) sampling: the most likely tokens whose probabilities add up to
top_p (0 to 1) are kept, and always at least the most likely one, so top_p=0 (like
temperature=0) picks the most likely token every time. A setting that is not a number, or is
out of range (temperature >= 0, 0 <= top_p <= 1, max_tokens >= 0), and a model path that is
missing or cannot be read, are a one-line error naming it, with exit status 2.
"""

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from rwkv_train.export import ModelFileError, load_weights
from rwkv_train.model import RWKV, RWKVConfig

PILE_VOCAB = 50277  # the GPT-NeoX tokenizer of the RWKV-4 Pile models


def load_model(path: str | os.PathLike, wkv_backend: str = "auto") -> RWKV:
    """An eval-mode fp32 model from a run folder, a training checkpoint or a .pth."""
    sd = load_weights(path)
    try:  # another model's weights lack names or shapes of the reference layout
        cfg = RWKVConfig.from_state_dict(sd)
    except (KeyError, IndexError, ValueError) as e:
        raise ModelFileError(f"{path} does not hold RWKV weights ({type(e).__name__}: {e})") from e
    cfg = dataclasses.replace(cfg, wkv_backend=wkv_backend)  # a bad backend: the caller's error
    with torch.device("meta"):
        net = RWKV(cfg)
    try:
        net.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    except RuntimeError as e:  # names or shapes beside those of the architecture read
        raise ModelFileError(
            f"{path} does not hold RWKV weights (names or shapes unlike the reference layout)"
        ) from e
    return net.eval()


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One token from logits (V,): nucleus sampling; temperature 0 is greedy.

    The most likely token is always kept, as nucleus samplers do: the smallest set with mass
    >= top_p is empty for top_p <= 0, which would divide 0 by 0 (so top_p=0 is greedy too).
    """
    if temperature < 0 or math.isnan(temperature):
        raise ValueError(f"temperature must be >= 0, not {temperature}")
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set with mass >= top_p
    keep[0] = True
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(order[choice])


@torch.no_grad()
def generate_ids(
    net: RWKV,
    prompt_ids: list[int],
    max_tokens: int = 200,
    temperature: float = 1.0,
    top_p: float = 0.85,
    seed: int = 0,
    agree: Callable[[int], int] | None = None,
    vocab: int | None = None,
) -> Iterator[int]:
    """Yields sampled token ids until max_tokens or token 0; with `vocab`, only ids below it
    (those the tokenizer can decode).

    `agree` maps each sampled token to the one to continue with. Processes that must make
    the same forward calls (ZeRO-3 gathers the weights of every call from all ranks) pass
    one that returns rank 0's token on every rank.
    """
    gen = torch.Generator().manual_seed(seed)  # its own RNG: sampling never moves training's
    device = next(net.parameters()).device
    ids = prompt_ids or [0]  # an empty prompt starts as after a document's end
    logits, state = net.forward_with_state(torch.tensor([ids], device=device), None)
    for _ in range(max_tokens):
        last = logits[0, -1].float().cpu()
        if vocab is not None:
            last[vocab:] = -math.inf
        tok = sample(last, temperature, top_p, gen)
        if agree is not None:
            tok = agree(tok)
        if tok == 0:
            return
        yield tok
        logits, state = net.forward_with_state(torch.tensor([[tok]], device=device), state)


def generate_text(
    net: RWKV, prompt: str, tokenizer: object | None = None, **kwargs: float | int
) -> Iterator[str]:
    """Yields decoded text pieces as tokens are sampled (World tokenizer by default)."""
    if tokenizer is None:
        from data_prep.tokenizer import WorldTokenizer

        tokenizer = WorldTokenizer()
    decoder = tokenizer.stream_decoder()  # type: ignore[attr-defined]
    vocab = len(tokenizer.tokens)  # type: ignore[attr-defined]
    ids = tokenizer.encode(prompt)  # type: ignore[attr-defined]
    for tok in generate_ids(net, ids, vocab=vocab, **kwargs):  # type: ignore[arg-type]
        piece = decoder.feed([tok])
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


# The numeric settings: their type, default, and the values allowed (with how to say so).
SETTINGS: dict[str, tuple[type, float | int, Callable[[float], bool], str]] = {
    "max_tokens": (int, 200, lambda v: v >= 0, "a whole number >= 0"),
    "temperature": (float, 1.0, lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "top_p": (float, 0.85, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "seed": (int, 0, lambda v: -(2**63) <= v < 2**64, "a whole number of 64 bits"),
}


def _parse(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[Path, str, dict[str, float | int]]:
    """The model path, the prompt and the numeric settings, each checked here: a mistake is
    a usage error naming the setting, before the model is loaded."""
    parser.add_argument("path", help="run folder, checkpoint or .pth")
    parser.add_argument("settings", nargs="*", help="key=value: prompt, max_tokens, ...")
    args = parser.parse_args(argv)
    prompt = ""
    settings = {key: default for key, (_, default, _, _) in SETTINGS.items()}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if sep and key == "prompt":
            prompt = value
            continue
        if not sep or key not in SETTINGS:
            parser.error(f"unknown setting {item!r}")
        kind, _, allowed, wanted = SETTINGS[key]
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not allowed(number):  # nan fails every comparison: refused too
            parser.error(f"{key} must be {wanted}, not {value!r}")
        settings[key] = number
    path = Path(args.path)
    if not path.exists():
        parser.error(f"no model at {path}")
    return path, prompt, settings


def main(argv: list[str] | None = None) -> None:
    """The command line: a user's mistake is a one-line usage error (exit status 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    path, prompt, settings = _parse(parser, argv)
    try:
        net = load_model(path)
    except (FileNotFoundError, ModelFileError) as e:
        parser.error(str(e))
    from data_prep.tokenizer import WorldTokenizer

    tokenizer = WorldTokenizer()
    if net.cfg.vocab_size == PILE_VOCAB:
        parser.error(f"{path} has the GPT-NeoX (Pile) vocabulary; generate reads World tokens")
    largest = max(tokenizer.encode(prompt), default=0)
    if largest >= net.cfg.vocab_size:
        parser.error(
            f"the prompt has World token id {largest}, but {path} has only "
            f"{net.cfg.vocab_size} ids: a model of a smaller vocabulary"
        )
    sys.stdout.write(prompt)
    for piece in generate_text(net, prompt, tokenizer, **settings):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
