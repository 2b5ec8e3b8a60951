"""A base and a perturbed "tuned" tiny model saved with save_pretrained, for the merge tests."""
import random

import torch

from tiny_models import tiny_model

# A word-level vocabulary for the tokenizer; test texts are random strings of these words.
WORDS = [f"w{i}" for i in range(60)]


def save_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]",
                                        pad_token="[PAD]")
    tokenizer.save_pretrained(str(folder))


def random_texts(count, seed, min_words=3, max_words=12):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(count)]


def perturbed(model, seed, scale=0.02):
    """A copy of ``model`` whose block i moves by (i + 1) * scale * std(W) per weight; embeddings a little too."""
    import copy

    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            parts = name.split(".")
            block = int(parts[2]) if parts[1] == "layers" else -1
            spread = param.abs().mean()
            param.add_((block + 2) * scale * spread * torch.randn(param.shape, generator=gen).to(param.dtype))
    return tuned


def save_pair(root, layers=4, dtype=torch.float32, shard=None, seed=0, **overrides):
    """Save base and tuned llama-style models (and a tokenizer) under ``root``; returns the folders and models."""
    base = tiny_model("llama", seed=seed, dtype=dtype, num_hidden_layers=layers, **overrides)
    tuned = perturbed(base, seed + 1)
    folders = []
    for name, model in (("base", base), ("tuned", tuned)):
        folder = root / name
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(str(folder), **kwargs)
        save_tokenizer(folder)
        folders.append(str(folder))
    return folders[0], folders[1], base, tuned
