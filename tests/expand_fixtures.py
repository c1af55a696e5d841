"""A tiny chat causal LM, made offline, for the `llm` prompt expander's tests.

Random weights (no model downloads here): a byte-level BPE tokenizer trained with `tokenizers` on
caption-like sentences, with ChatML special tokens and chat template, and a 2-layer Qwen2, both
saved to a folder that the expander loads like a user's downloaded model (FACTS.md). What it
writes is gibberish but fixed by its weights, which is all the bookkeeping tests need.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""<|endoftext|> is id 0: a model whose logits are all equal picks it (greedy argmax) and stops."""
WORDS = (
    "a an the red green blue yellow white small large circle square triangle moves left right up "
    "down slowly quickly grows shrinks rotates on black background video image of sunset sea cat "
    "dog runs across field city night rain detailed caption rewrite prompt examples style"
).split()


def _sentences() -> list[str]:
    """A few hundred short caption-like lines: enough for a small BPE vocabulary."""
    lines = []
    for index in range(400):
        picked = [WORDS[(index * step + 7) % len(WORDS)] for step in (1, 3, 5, 11, 13, 17)]
        lines.append(" ".join(picked) + ".")
    return lines


def tiny_chat_lm(folder: Path, *, silent: bool = False, seed: int = 0) -> Path:
    """Save a tiny Qwen2 causal LM with a chat-template tokenizer to `folder`.

    silent=True zeroes the output head, so every position scores all tokens alike: greedy
    decoding picks id 0, <|endoftext|>, the end of text, and the model answers nothing.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_sentences(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    # sampling defaults, as published instruct models ship them: the expander must not use them
    model.generation_config.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20)
    if silent:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.save_pretrained(folder)
    return folder
