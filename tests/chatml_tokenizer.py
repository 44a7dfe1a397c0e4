"""A ChatML tokenizer built in memory, for tests that need neither vLLM nor the model.

Byte-level: every byte is one token (a BPE model over the 256-symbol byte alphabet with no
merges), so token counts equal UTF-8 byte counts and any text round-trips. The special tokens
take SmolLM2's ids (``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2); the bytes
follow from id 3. The chat template is SmolLM2-135M-Instruct's, with the default system prompt
as a parameter.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def chatml_template(default_system: str | None) -> str:
    """SmolLM2-135M-Instruct's chat template; without a default system prompt if None."""
    head = ""
    if default_system is not None:
        # The default goes into a Jinja string literal: keep it to plain text.
        if "'" in default_system or "\\" in default_system or "{" in default_system:
            raise ValueError("the default system prompt must not contain ', \\ or {")
        head = ("{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\n" + default_system + "<|im_end|>\n' }}{% endif %}")
    return ("{% for message in messages %}" + head
            + "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
              "+ '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chatml_tokenizer(default_system: str | None = SMOLLM2_SYSTEM) -> PreTrainedTokenizerFast:
    """A byte-level ChatML tokenizer; see the module docstring."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 symbols, one per byte
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({sym: len(SPECIAL_TOKENS) + i for i, sym in enumerate(alphabet)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = chatml_template(default_system)
    return tok
