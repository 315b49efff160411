"""Rewards: `\\boxed{}` answer extraction (`answer_extraction`), the built-in math reward with math-verify in a
killable child (`math_reward`, `math_verify_worker`), user rewards loaded by spec (`user_function`, `loading`) and run
in a pool of child processes under a time bound (`workers`), batch scoring (`scoring`, which re-exports every reward
name), and a last-number reward for models that never box (`lenient_reward`).

Bottom layer, beside `algorithms` and `models`: imports `kpo_lightning.config` / `kpo_lightning.errors` only; never
Lightning, torch only where a batch of rewards becomes a tensor.
"""
