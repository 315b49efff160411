"""Check that the shipped `tiny-arith` policy leaves RL something to learn, and that RL learns it fast on a CPU.

A self-contained on-policy GRPO/REINFORCE loop in plain torch + transformers (no Lightning, no KPO):
  rollout  8 train prompts x 8 samples at temperature 1.0 (model.generate, top_k 0, top_p 1)
  reward   1 if the last \\boxed{} holds the right integer, else 0
  adv      per-prompt group normalisation: (r - mean) / (std + 1e-6)
  loss     -A * mean log p over the completion tokens (prompt and padding masked, eos kept), AdamW
Training stops after --budget_s seconds of rollouts + updates (evaluation is not counted). Held-out sampled
accuracy (avg@8, T=1.0, validation pairs never seen in training) is printed before and after, per seed and lr.

    python scripts/check_learnability.py --seeds 0 1 2 --lrs 3e-4 1e-3 --budget_s 90
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kpo_lightning.data.arithmetic import arithmetic_problem, exact_match_reward, validation_problem

ASSET_DIR = Path(__file__).resolve().parents[1] / "kpo_lightning" / "assets" / "tiny-arith"
SAMPLING = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)


@torch.no_grad()
def rollout(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: list[dict], k: int, max_new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Sample k completions per problem. Returns (sequences, attention_mask, prompt_width, rewards).

    attention_mask covers the real prompt tokens and the completion up to and including its first eos."""
    model.eval()
    prompts = [p["prompt"] for p in problems for _ in range(k)]
    answers = [p["answer"] for p in problems for _ in range(k)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    seqs = model.generate(**batch, **SAMPLING, max_new_tokens=max_new_tokens)
    width = batch["input_ids"].shape[1]
    completion = seqs[:, width:]
    is_eos = completion == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first eos
    completion_mask = ~after_eos
    attn = torch.cat([batch["attention_mask"], completion_mask.long()], dim=1)
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    rewards = torch.tensor([exact_match_reward(t, a) for t, a in zip(texts, answers)])
    return seqs, attn, width, rewards


def group_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, over the group's (unbiased) std + 1e-6."""
    r = rewards.view(-1, k)
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-6)).view(-1)


def policy_loss(
    model: PreTrainedModel, seqs: torch.Tensor, attn: torch.Tensor, width: int, adv: torch.Tensor
) -> torch.Tensor:
    """-A * (mean log-prob of the response's completion tokens), averaged over responses."""
    model.train()
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # same positions generate() used under left padding
    logits = model(input_ids=seqs, attention_mask=attn, position_ids=position_ids).logits
    logits = logits[:, width - 1 : -1].float()  # the logits that predicted each completion token
    targets = seqs[:, width:]
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = attn[:, width:].float()
    seq_logp = (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return -(adv * seq_logp).mean()


@torch.no_grad()
def avg_at_k(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: list[dict], k: int, max_new_tokens: int
) -> float:
    """Mean reward of k temperature-1.0 samples per problem."""
    return rollout(model, tokenizer, problems, k, max_new_tokens)[3].mean().item()


def run(base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int, lr: float, args) -> dict:
    """One RL run from a fresh copy of `base`: held-out accuracy before/after `args.budget_s` of training."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    val = [validation_problem(seed, i) for i in range(args.val_prompts)]
    before = avg_at_k(model, tokenizer, val, args.k, args.max_new_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    spent, step, train_rewards = 0.0, 0, []
    while spent < args.budget_s and step < args.max_steps:
        t0 = time.perf_counter()
        problems = [arithmetic_problem(seed, step * args.prompts + i) for i in range(args.prompts)]
        seqs, attn, width, rewards = rollout(model, tokenizer, problems, args.k, args.max_new_tokens)
        loss = policy_loss(model, seqs, attn, width, group_advantages(rewards, args.k))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        spent += time.perf_counter() - t0
        step += 1
        train_rewards.append(rewards.mean().item())
        if step % args.log_every == 0:
            recent = sum(train_rewards[-args.log_every :]) / args.log_every
            print(f"  seed {seed} lr {lr:g} step {step:4d}  train reward {recent:.3f}  {spent:.0f}s", flush=True)
    after = avg_at_k(model, tokenizer, val, args.k, args.max_new_tokens)
    return dict(seed=seed, lr=lr, steps=step, seconds=spent, before=before, after=after)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ASSET_DIR)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--budget_s", type=float, default=90.0, help="seconds of rollouts + updates per run")
    ap.add_argument("--max_steps", type=int, default=10_000)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=12)
    ap.add_argument("--val_prompts", type=int, default=128)
    ap.add_argument("--log_every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    results = []
    for lr in args.lrs:
        for seed in args.seeds:
            r = run(base, tokenizer, seed, lr, args)
            results.append(r)
            print(
                f"seed {r['seed']} lr {r['lr']:g}: {r['steps']} steps in {r['seconds']:.0f}s, "
                f"held-out avg@{args.k} {r['before']:.3f} -> {r['after']:.3f} ({r['after'] - r['before']:+.3f})",
                flush=True,
            )
    print("\nsummary")
    for r in results:
        print(
            f"  lr {r['lr']:<8g} seed {r['seed']}  steps {r['steps']:4d}  {r['seconds']:5.0f}s  "
            f"{r['before']:.3f} -> {r['after']:.3f}  ({r['after'] - r['before']:+.3f})"
        )


if __name__ == "__main__":
    main()
