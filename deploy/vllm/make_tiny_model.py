"""Build a tiny Llama, its tokenizer and N random LoRA adapters into a directory, with no download.

Run it with the `.venv-vllm` interpreter (needs torch, transformers, tokenizers, peft)::

    .venv-vllm/bin/python deploy/vllm/make_tiny_model.py OUT --adapters 4 --ranks 8,16 --seed 0

Layout written::

    OUT/model/           config.json, model.safetensors, tokenizer files   (the base model, ~2 MB)
    OUT/loras/lora-K/    adapter_config.json, adapter_model.safetensors    (K = 0 … N-1; rank ranks[K mod len])
    OUT/manifest.json    {"model": ..., "adapters": [{"name", "path", "rank"}], "seed": ..., ...}

Deterministic for a given seed (weights and tokenizer byte-identical; adapter_config.json records the base model's
absolute path, as peft writes it): the tokenizer is trained on a corpus generated from the seed, the weights come from
a seeded torch generator. head_dim must be 64 (vLLM's CPU attention rejects small head sizes such as 16). Adapter
weights are random on both A and B (``init_lora_weights=False``), scaled up so each adapter visibly changes the
base model's greedy output, which is how the tests check that an adapter really applies.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

log = logging.getLogger("make_tiny_model")

WORDS = (
    "the a an adapter rank token batch server request queue cache block prefill decode slot model serve twin "
    "window throughput latency kafka stream replay learner drift config memory page lora weight matrix tensor "
    "alpha beta gamma delta red green blue one two three four five six seven eight nine ten and or not with for"
).split()


def corpus(seed: int, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) for _ in range(lines)]


def build_tokenizer(out: Path, seed: int, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=4096
    )
    fast.save_pretrained(out)
    return fast


def build(out: Path, adapters: int, ranks: list[int], seed: int, vocab_size: int = 512,
          max_position_embeddings: int = 2048) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(model_dir, seed, vocab_size)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    base = LlamaForCausalLM(config)
    base.save_pretrained(model_dir)
    log.info("base model: %s parameters -> %s", sum(p.numel() for p in base.parameters()), model_dir)

    entries = []
    for k in range(adapters):
        rank = ranks[k % len(ranks)]
        torch.manual_seed(seed * 1000 + k + 1)
        fresh = LlamaForCausalLM.from_pretrained(model_dir)
        peft_model = get_peft_model(
            fresh,
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                       lora_dropout=0.0, init_lora_weights=False),
        )
        with torch.no_grad():  # make the delta large enough to flip greedy tokens of a random model
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.mul_(4.0)
        path = out / "loras" / f"lora-{k}"
        peft_model.save_pretrained(path)
        (path / "README.md").unlink(missing_ok=True)  # peft's model-card stub, not needed
        entries.append({"name": f"lora-{k}", "path": str(path.resolve()), "rank": rank})
        log.info("adapter lora-%d rank %d -> %s", k, rank, path)

    manifest = {
        "model": str(model_dir.resolve()),
        "adapters": entries,
        "max_lora_rank": max(ranks),
        "seed": seed,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": max_position_embeddings,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="directory to write (created)")
    ap.add_argument("--adapters", type=int, default=4, help="number of LoRA adapters (default 4)")
    ap.add_argument("--ranks", default="8,16", help="ranks, round-robin over adapters (default 8,16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=512)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    if not ranks or min(ranks) < 1:
        ap.error("--ranks needs positive integers, e.g. 8,16")
    manifest = build(args.out, args.adapters, ranks, args.seed, args.vocab_size)
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
