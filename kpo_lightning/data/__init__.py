"""Prompts: records read from files and hub datasets (`records`), seeded resumable prompt sources (`prompt_sources`),
the built-in tasks (`arithmetic`, `chain_arithmetic`), prompt and chat templates (`prompt_template`), a prompt's token
ids (`prompt_tokens`) and the Lightning DataModule that streams them (`datamodule`).

Layer 2, above `rewards` (a built-in task scores with its answer extraction); below `rollout`. Only `datamodule` imports
Lightning.
"""
