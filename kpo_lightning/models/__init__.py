"""Models and tokenizers: loading by name (local folder, hub name, GGUF, the built-ins) with LoRA, dropout and
weight-decay rules (`loading`), the shipped tiny models and their character tokenizer (`tiny_models`,
`char_tokenizer`), FSDP2 sharding of a transformers model in plain torch (`sharding`), export of a checkpoint
to a Hugging Face folder (`export`), and what the memory plan reads: config.json, exact parameter counts on the
meta device, a device's free memory (`memory`).

Bottom layer, beside `algorithms` and `rewards`: imports torch, transformers, peft and `kpo_lightning.config` /
`kpo_lightning.errors` only; never Lightning.
"""
