"""Peak memory of per-token log-probs: naive float32 log_softmax + gather vs `kpo_lightning.algorithms.logprobs`, and
of the whole log-prob path of a training step (LM head + log-probs + backward), old route vs new.

Run: `python benchmarks/logprob_memory.py [--section all|logits|path] [--repeats 3] [--tokens 2048]
[--vocab 49152] [--dtypes bf16,fp32] [--modes fwd+bwd,fwd]
[--variants old,full,new-copy,new] [--batch 2 --prompt 64 --response 512 --path-vocab 151936 --hidden 128]
[--temperature 1.0]`.

Section `logits`: the log-prob function alone on given logits (tokens x vocab). Section `path`: a tiny Qwen3
(hidden 128, 2 layers, untied head) with a paper-size vocabulary, B sequences of P prompt + R response
tokens, from input ids to parameter gradients, four routes: `old` = the previous KPOModule.sequence_logprobs
(logits_to_keep=R+1, then logits[:, :-1], flattened for token_logprobs: a copy, and a zero-padded gradient
in backward); `full` = a model without logits_to_keep (all T positions, scored in place with start=P-1);
`new-copy` = logits_to_keep = the R scoring positions, the logits' gradient in a new tensor; `new` =
kpo_lightning.algorithms.sequence_logprobs (the same, gradient written over the logits). Each figure is
median (min-max) over --repeats fresh processes.

How peak memory is measured on CPU: every (variant, dtype, mode) runs in a fresh subprocess. The child
allocates the logits (and touches them), then resets the kernel's resident-set high-water mark by writing
"5" to /proc/self/clear_refs, records the current RSS as the baseline, runs the variant, and reads VmHWM
from /proc/self/status: peak = VmHWM - baseline, i.e. the most extra resident memory at any instant,
including the logits' gradient for forward+backward. Large tensors are mmap-backed and returned to the OS
when freed, so RSS tracks live tensor memory. Where clear_refs is unavailable it falls back to
getrusage().ru_maxrss minus the RSS baseline (valid when the call's peak exceeds earlier peaks). Children
run with MALLOC_MMAP_THRESHOLD_=131072 so that glibc serves every large block by mmap and unmaps it on free;
with glibc's default dynamic threshold, freed blocks up to 32 MiB (the chunked variant's temporaries) stay
in the heap and RSS over-counts live memory by a varying amount (pass --default-malloc to see). A
`control` row allocates exactly one float32 (tokens x vocab) tensor to show the method's accuracy.
With CUDA, the same runs also report torch.cuda.max_memory_allocated() above the baseline allocation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

MiB = 1024 * 1024
PATH_VARIANTS = ("old", "full", "new-copy", "new")


def _rss_bytes(field: str) -> int:
    """A field (VmRSS, VmHWM) of /proc/self/status in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure_peak(run: Callable[[], None], cuda: bool) -> dict:
    """Run `run` once and report the resident-memory high-water mark above the level before it (and CUDA's peak
    above what was allocated, on a GPU) and its seconds."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    exact = _reset_peak()
    base = _rss_bytes("VmRSS")
    t0 = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    hwm = _rss_bytes("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = {"peak_rss": hwm - base, "method": "VmHWM" if exact else "ru_maxrss", "seconds": seconds}
    if cuda:
        res["peak_cuda"] = torch.cuda.max_memory_allocated() - base_cuda
    return res


def _child(variant: str, dtype_name: str, mode: str, n: int, vocab: int, temperature: float, device: str) -> dict:
    """Run one variant in this (fresh) process and return its peak extra memory."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from kpo_lightning.algorithms.logprobs import token_logprobs

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, vocab, generator=gen) * 2).to(dtype).to(device)
    tokens = torch.randint(0, vocab, (n,), generator=gen).to(device)
    weights = torch.randn(n, generator=gen).to(device)
    grad = mode == "fwd+bwd"
    logits.requires_grad_(grad)

    def naive():
        x = logits.float()
        if temperature != 1.0:
            x = x / temperature
        return torch.log_softmax(x, -1).gather(-1, tokens[:, None]).squeeze(-1)

    def plain_chunked():  # chunking without a custom backward: autograd saves every float32 chunk
        rows = max(1, (1 << 23) // vocab)
        outs = []
        for s in range(0, n, rows):
            x = logits[s : s + rows].float()
            if temperature != 1.0:
                x = x / temperature
            outs.append(x.gather(1, tokens[s : s + rows, None]).squeeze(1) - torch.logsumexp(x, -1))
        return torch.cat(outs)

    def ours():
        return token_logprobs(logits, tokens, temperature)

    def control():
        return torch.ones(n, vocab, dtype=torch.float32, device=device).sum(-1)

    fn = {"naive": naive, "plain": plain_chunked, "chunked": ours, "control": control}[variant]

    def run() -> None:
        with torch.set_grad_enabled(grad):
            out = fn()
            if grad and variant != "control":
                (out * weights).sum().backward()

    return _measure_peak(run, cuda=device == "cuda")


def _path_child(variant: str, dtype_name: str, mode: str, a: argparse.Namespace) -> dict:
    """Whole log-prob path in this (fresh) process: model forward, log-probs, backward to the parameters."""
    import torch
    from torch import nn
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from kpo_lightning.algorithms.logprobs import token_logprobs
    from kpo_lightning.algorithms.sequence_logprobs import sequence_logprobs

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    cfg = Qwen3Config(
        vocab_size=a.path_vocab,
        hidden_size=a.hidden,
        intermediate_size=2 * a.hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=a.hidden // 4,
        max_position_embeddings=a.prompt + a.response,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(dtype).to(a.device).eval()
    gen = torch.Generator().manual_seed(0)
    total = a.prompt + a.response
    ids = torch.randint(0, a.path_vocab, (a.batch, total), generator=gen).to(a.device)
    mask = torch.ones_like(ids)
    mask[0, : a.prompt // 2] = 0  # one left-padded prompt
    weights = torch.randn(a.batch, a.response, generator=gen).to(a.device)
    grad = mode == "fwd+bwd"
    model.requires_grad_(grad)

    class NoLogitsToKeep(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache
            )

    def old(rows):  # the route before: R + 1 positions, slice, flatten (copies), padded gradient in backward
        i, m = ids[rows], mask[rows]
        pos = (m.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=i, attention_mask=m, position_ids=pos, use_cache=False, logits_to_keep=a.response + 1
        ).logits[:, :-1]
        return token_logprobs(logits.reshape(-1, logits.shape[-1]), i[:, a.prompt :].reshape(-1), a.temperature).view(
            len(i), -1
        )

    def full(rows):
        return sequence_logprobs(NoLogitsToKeep(model), ids[rows], mask[rows], a.prompt, a.temperature)[0]

    def new_copy(rows):  # the new route with the logits' gradient in a fresh tensor (in_place_backward=False)
        i, m = ids[rows], mask[rows]
        pos = (m.long().cumsum(-1) - 1).clamp(min=0)
        keep = torch.arange(a.prompt - 1, total - 1, device=i.device)
        logits = model(input_ids=i, attention_mask=m, position_ids=pos, use_cache=False, logits_to_keep=keep).logits
        return token_logprobs(logits, i[:, a.prompt :], a.temperature)

    def new(rows):
        return sequence_logprobs(model, ids[rows], mask[rows], a.prompt, a.temperature)[0]

    fn = {"old": old, "full": full, "new-copy": new_copy, "new": new}[variant]

    def step(rows):
        with torch.set_grad_enabled(grad):
            out = fn(rows)
            if grad:
                (out * weights[rows]).sum().backward()
        return out

    step(slice(0, 1))  # warm-up on one sequence: library initialisation is not part of the peak
    model.zero_grad(set_to_none=True)
    res = _measure_peak(lambda: step(slice(None)), cuda=a.device == "cuda")
    res["param_grads"] = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return res


def _spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """'median (min-max)' of repeated measurements; just the value for one."""
    v = sorted(values)
    med = statistics.median(v)
    if len(v) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(v[0])}-{fmt.format(v[-1])})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", choices=("all", "logits", "path"), default="all")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per figure (min/median/max)")
    ap.add_argument("--tokens", type=int, default=2048, help="logits section: B*T rows")
    ap.add_argument("--vocab", type=int, default=49152, help="logits section: vocabulary")
    ap.add_argument("--batch", type=int, default=2, help="path section: sequences")
    ap.add_argument("--prompt", type=int, default=64, help="path section: prompt tokens P")
    ap.add_argument("--response", type=int, default=512, help="path section: response tokens R")
    ap.add_argument("--path-vocab", type=int, default=151936, help="path section: vocabulary (Qwen3's)")
    ap.add_argument("--hidden", type=int, default=128, help="path section: hidden size of the tiny Qwen3")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated subset of bf16,fp32")
    ap.add_argument("--modes", default="fwd+bwd,fwd", help="comma-separated subset of fwd+bwd,fwd")
    ap.add_argument(
        "--variants",
        default=",".join(PATH_VARIANTS),
        help="path section: comma-separated subset of " + ",".join(PATH_VARIANTS),
    )
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--default-malloc", action="store_true", help="do not pin glibc's mmap threshold")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "DTYPE", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--path-child", nargs=3, metavar=("VARIANT", "DTYPE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtypes = [d for d in args.dtypes.split(",") if d]
    modes = [m for m in args.modes.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    for name, got, allowed in (
        ("dtypes", dtypes, ("bf16", "fp32")),
        ("modes", modes, ("fwd+bwd", "fwd")),
        ("variants", variants, PATH_VARIANTS),
    ):
        if not got or any(x not in allowed for x in got):
            ap.error(f"--{name} must be a comma-separated subset of {','.join(allowed)}, got {getattr(args, name)!r}")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(_child(*args.child, args.tokens, args.vocab, args.temperature, args.device)))
        return
    if args.path_child:
        print(json.dumps(_path_child(*args.path_child, args)))
        return

    def run(variant: str, dtype: str, mode: str, flag: str = "--child") -> list[dict]:
        cmd = [sys.executable, os.path.abspath(__file__), flag, variant, dtype, mode]
        for key in ("tokens", "vocab", "batch", "prompt", "response", "path_vocab", "hidden", "temperature", "device"):
            cmd += ["--" + key.replace("_", "-"), str(getattr(args, key))]
        env = dict(os.environ)
        if not args.default_malloc:
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        results = []
        for _ in range(args.repeats):
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        return results

    def mib(results: list[dict], key: str = "peak_rss") -> str:
        return _spread([r[key] / MiB for r in results])

    def secs(results: list[dict]) -> str:
        return _spread([r["seconds"] for r in results], "{:.2f}")

    cuda = args.device == "cuda"
    from machine import machine_line  # benchmarks/ is sys.path[0] when this script runs

    print(machine_line())
    print(
        f"device={args.device}; each figure: median (min-max) over {args.repeats} fresh processes; "
        f"peak = extra memory above the baseline at the high-water mark"
    )
    if args.section in ("all", "logits"):
        f32_mib = args.tokens * args.vocab * 4 / MiB
        print(
            f"\n== logits: tokens={args.tokens} vocab={args.vocab} T={args.temperature}; "
            f"one float32 (tokens x vocab) tensor = {f32_mib:.0f} MiB"
        )
        ctrl = run("control", "fp32", "fwd")
        print(f"control (allocates exactly {f32_mib:.0f} MiB): measured {mib(ctrl)} MiB via {ctrl[0]['method']}")
        print(
            "| logits | mode | naive MiB | plain-chunk MiB | ours MiB | naive / ours | naive s | ours s |"
            + (" naive cuda MiB | ours cuda MiB |" if cuda else "")
        )
        print("|---|---|---|---|---|---|---|---|" + ("---|---|" if cuda else ""))
        for dtype in dtypes:
            for mode in modes:
                a, p, b = run("naive", dtype, mode), run("plain", dtype, mode), run("chunked", dtype, mode)
                ratio = _spread([x["peak_rss"] / max(y["peak_rss"], 1) for x, y in zip(a, b)], "{:.1f}")
                line = f"| {dtype} | {mode} | {mib(a)} | {mib(p)} | {mib(b)} | {ratio}x | {secs(a)} | {secs(b)} |"
                if cuda:
                    line += f" {mib(a, 'peak_cuda')} | {mib(b, 'peak_cuda')} |"
                print(line, flush=True)
        print(
            "peak = extra memory above the allocated logits; fwd+bwd includes logits.grad (logits' dtype), "
            "which every variant produces. plain-chunk = per-chunk logsumexp without a custom backward; "
            "ours = kpo_lightning.algorithms.logprobs.token_logprobs."
        )
    if args.section in ("all", "path"):
        total = args.prompt + args.response
        print(
            f"\n== path: tiny Qwen3 (hidden {args.hidden}, 2 layers), vocab {args.path_vocab}, "
            f"B={args.batch} x (P={args.prompt} + R={args.response}) tokens, T={args.temperature}"
        )
        cols = " | ".join(f"{v} MiB" for v in PATH_VARIANTS)
        print(
            f"| dtype | mode | (B, R, V) MiB | {cols} | old / new | param grads MiB | "
            + " | ".join(f"{v} s" for v in PATH_VARIANTS)
            + " |"
            + (" old cuda MiB | new cuda MiB |" if cuda else "")
        )
        print("|---|---|---|" + "---|" * (2 * len(PATH_VARIANTS) + 2) + ("---|---|" if cuda else ""))
        for dtype in dtypes:
            unit = args.batch * args.response * args.path_vocab * (2 if dtype == "bf16" else 4) / MiB
            for mode in modes:
                res = {v: run(v, dtype, mode, "--path-child") for v in variants}
                o, n = res.get("old"), res.get("new")
                ratio = (
                    _spread([x["peak_rss"] / max(y["peak_rss"], 1) for x, y in zip(o, n)], "{:.1f}") + "x"
                    if o and n
                    else "-"
                )
                grads = next(iter(res.values()))[0]["param_grads"] / MiB
                line = (
                    f"| {dtype} | {mode} | {unit:.0f} | "
                    + " | ".join(mib(res[v]) if v in res else "-" for v in PATH_VARIANTS)
                    + f" | {ratio} | {grads:.0f} | "
                    + " | ".join(secs(res[v]) if v in res else "-" for v in PATH_VARIANTS)
                    + " |"
                )
                if cuda:
                    line += f" {mib(o, 'peak_cuda') if o else '-'} | {mib(n, 'peak_cuda') if n else '-'} |"
                print(line, flush=True)
        print(
            f"peak = extra memory above the model and inputs, from input ids to parameter gradients (included, "
            f"column 'param grads'); (B, R, V) = one logits tensor of the response; T = P + R = {total}. "
            "old = logits_to_keep=R+1, logits[:, :-1] flattened (copy) + zero-padded gradient; full = model "
            "without logits_to_keep, window scored in place; new-copy = logits_to_keep = the R scoring positions, "
            "gradient in a new tensor; new = kpo_lightning.algorithms.sequence_logprobs (that, gradient over the "
            "logits)."
        )


if __name__ == "__main__":
    main()
