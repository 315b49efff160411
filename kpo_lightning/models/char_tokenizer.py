"""A character-level tokenizer built in code (no hub download), for the tiny built-in models.

One token per character: a WordLevel model over single characters, with a pre-tokenizer that splits the text
into its characters and a Fuse decoder that joins them back without spaces, so
`decode(encode(s), skip_special_tokens=True) == s` for any string made of vocabulary characters.

Special tokens (fixed ids): <pad>=0, </s>=1 (eos), <s>=2 (bos), <unk>=3. Pad and eos are distinct, so masking
padding never masks the eos a policy must learn to emit. No bos/eos is added on encode: `tok("12+34=")` is
exactly the prompt's characters, the same ids whether or not a caller goes through a chat template. Padding is
on the left, for batched generation.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "</s>", "<s>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK]  # ids 0, 1, 2, 3
# digits and arithmetic, the \boxed{} answer format, letters and punctuation for worded prompts
CHARACTERS = string.digits + "+-*/=?^()[]{}\\ .,:;!'\"" + string.ascii_lowercase + string.ascii_uppercase + "\n"
MODEL_MAX_LENGTH = 512
# Chat template: the concatenated message contents, nothing added, so chat and plain prompts tokenize alike.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def build_char_tokenizer(
    model_max_length: int = MODEL_MAX_LENGTH, vocab_size: int | None = None
) -> PreTrainedTokenizerFast:
    """The character tokenizer: ~90 tokens, specials first, left padding.

    `vocab_size` fills the vocabulary up to that many ids with tokens `<i>` (i = the id): encode never produces
    them (it splits text into characters) and decode gives their text, so a random model with a large vocabulary
    (scripts/gpu_check.py: Qwen3's 151,936) samples text that contains digits and varies.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    for i in range(len(vocab), vocab_size or 0):
        vocab[f"<{i}>"] = i
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    backend.decoder = decoders.Fuse()  # join tokens with no separator
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
