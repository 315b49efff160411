"""Train the shipped `tiny-arith` policy by supervised learning and save it to kpo_lightning/assets/tiny-arith/.

The point of this model is to be a good *starting point for RL*, not a good arithmetic model. Training has two
phases: the first --clean_frac of the steps teach addition with clean labels (fast to learn), the rest use a
"noisy teacher": every answer digit's target is the correct digit with probability 1 - noise and a uniformly
random digit otherwise (as soft targets: the same objective as sampling noisy labels, with less variance). The
`\\boxed{...}` format and eos are always taught without noise. The result (default seed):
- the format is produced reliably (boxed 1.00), so rewards are about correctness, not parsing;
- at temperature 1.0 each digit is right with probability ~1 - 0.9 * noise (0.6), so a sampled answer is right
  only ~26% of the time (room for RL to climb), while the most likely answer is almost always the right one
  (greedy ~0.99): sharpening the distribution is what RL has to do, and it pays off within a few dozen updates
  (scripts/check_learnability.py).

Deterministic given --seed (CPU, fixed thread count; evaluation does not touch the training RNG). The defaults
write the shipped asset: 0.68M parameters, 2.7 MB, 2-7 minutes on 2 CPU cores (0.12 s/step when idle, more
when the cores are shared).
    python scripts/make_tiny_model.py
    python scripts/make_tiny_model.py --out /tmp/x --steps 300 --noise 0.3
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from kpo_lightning.data.arithmetic import arithmetic_problem, exact_match_reward, format_completion, validation_problem
from kpo_lightning.models.char_tokenizer import build_char_tokenizer
from kpo_lightning.models.tiny_models import plain_sampling_config, tiny_llama_config

ASSET_DIR = Path(__file__).resolve().parents[1] / "kpo_lightning" / "assets" / "tiny-arith"
# The shipped architecture: ~0.8M parameters, ~3 MB in float32.
ARCH = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)


def make_batch(
    tokenizer: PreTrainedTokenizerBase, problems: list[dict], bos_prob: float, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels, digit_mask) for prompt + `\\boxed{answer}` + eos.

    labels are -100 on the prompt and padding, so only the completion (eos included) is learned. A few rows
    start with bos so the model also works for callers that prepend one. digit_mask marks the answer digits.
    """
    rows, masks = [], []
    for p in problems:
        prompt = tokenizer.encode(p["prompt"], add_special_tokens=False)
        if rng.random() < bos_prob:
            prompt = [tokenizer.bos_token_id] + prompt
        completion = tokenizer.encode(format_completion(p["answer"]), add_special_tokens=False)
        completion = completion + [tokenizer.eos_token_id]
        rows.append((prompt, completion))
        n_prefix = len(tokenizer.encode("\\boxed{", add_special_tokens=False))
        digits = [0] * len(prompt) + [0] * n_prefix + [1] * len(p["answer"]) + [0] * 2  # "}" and eos
        masks.append(digits)
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    digit_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, ((prompt, completion), digits) in enumerate(zip(rows, masks)):
        seq = prompt + completion
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        labels[i, len(prompt) : len(seq)] = torch.tensor(completion)
        digit_mask[i, : len(digits)] = torch.tensor(digits, dtype=torch.bool)
    return ids, attn, labels, digit_mask


def noisy_teacher_loss(
    logits: torch.Tensor, labels: torch.Tensor, digit_mask: torch.Tensor, digit_ids: torch.Tensor, noise: float
) -> torch.Tensor:
    """Cross-entropy on completion tokens; on answer digits the target is (1-noise)*correct + noise*uniform(digits)."""
    logits, labels, digit_mask = logits[:, :-1], labels[:, 1:], digit_mask[:, 1:]  # predict token t+1 from <= t
    valid = labels != -100
    logp = F.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    uniform_nll = -logp[..., digit_ids].mean(-1)
    per_token = torch.where(digit_mask, (1 - noise) * nll + noise * uniform_nll, nll)
    return (per_token * valid).sum() / valid.sum()


@torch.no_grad()
def sampled_accuracy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[dict],
    k: int,
    max_new_tokens: int = 12,
    do_sample: bool = True,
) -> tuple[float, float]:
    """(avg@k accuracy, share of completions with a parsable \\boxed{}) at temperature 1.0 (or greedy)."""
    model.eval()
    prompts = [p["prompt"] for p in problems for _ in range(k if do_sample else 1)]
    answers = [p["answer"] for p in problems for _ in range(k if do_sample else 1)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
    out = model.generate(**batch, **sampling, max_new_tokens=max_new_tokens)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    rewards = [exact_match_reward(t, a) for t, a in zip(texts, answers)]
    boxed = [t.startswith("\\boxed{") and t.endswith("}") for t in texts]
    return sum(rewards) / len(rewards), sum(boxed) / len(boxed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ASSET_DIR)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--noise", type=float, default=0.45, help="per-digit probability of a uniform random digit")
    ap.add_argument(
        "--clean_frac",
        type=float,
        default=0.6,
        help="first fraction of steps trained without noise (learn addition), then --noise (calibrate)",
    )
    ap.add_argument("--max_operand", type=int, default=99)
    ap.add_argument("--eval_every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = build_char_tokenizer()
    config = tiny_llama_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **ARCH,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params / 1e6:.2f}M")
    digit_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list("0123456789")))

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    def lr_factor(s: int) -> float:  # linear warm-up, cosine decay to 10%
        cosine = 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
        return min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * cosine)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    val = [validation_problem(args.seed, i, args.max_operand) for i in range(128)]
    t0 = time.time()
    for step in range(args.steps):
        model.train()
        problems = [
            arithmetic_problem(args.seed, step * args.batch_size + i, args.max_operand) for i in range(args.batch_size)
        ]
        ids, attn, labels, digit_mask = make_batch(tokenizer, problems, bos_prob=0.1, rng=rng)
        logits = model(input_ids=ids, attention_mask=attn).logits
        noise = 0.0 if step < args.clean_frac * args.steps else args.noise
        loss = noisy_teacher_loss(logits, labels, digit_mask, digit_ids, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            greedy, _ = sampled_accuracy(model, tokenizer, val, k=1, do_sample=False)
            acc, fmt = sampled_accuracy(model, tokenizer, val[:64], k=8)
            print(
                f"step {step + 1:5d}  loss {loss.item():.4f}  val greedy {greedy:.3f}  val avg@8 (T=1) {acc:.3f}"
                f"  boxed {fmt:.3f}  {time.time() - t0:.0f}s",
                flush=True,
            )

    model.generation_config = plain_sampling_config(tokenizer, max_new_tokens=12)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    final_val = [validation_problem(args.seed + 1, i, args.max_operand) for i in range(256)]
    torch.manual_seed(args.seed)
    acc, fmt = sampled_accuracy(model, tokenizer, final_val, k=8)
    greedy, _ = sampled_accuracy(model, tokenizer, final_val, k=1, do_sample=False)
    print(f"saved to {args.out}  final val avg@8 (T=1.0) {acc:.3f}  greedy {greedy:.3f}  boxed {fmt:.3f}")


if __name__ == "__main__":
    main()
