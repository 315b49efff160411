"""Peak memory of per-token log-probs: naive float32 log_softmax + gather vs `kpo_lightning.logprobs`.

Run: `python benchmarks/logprob_memory.py [--tokens 2048] [--vocab 49152] [--temperature 1.0]`.

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
import subprocess
import sys
import time

MiB = 1024 * 1024


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


def _child(variant: str, dtype_name: str, mode: str, n: int, vocab: int, temperature: float, device: str) -> dict:
    """Run one variant in this (fresh) process and return its peak extra memory."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from kpo_lightning.logprobs import token_logprobs

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
            x = logits[s:s + rows].float()
            if temperature != 1.0:
                x = x / temperature
            outs.append(x.gather(1, tokens[s:s + rows, None]).squeeze(1) - torch.logsumexp(x, -1))
        return torch.cat(outs)

    def ours():
        return token_logprobs(logits, tokens, temperature)

    def control():
        return torch.ones(n, vocab, dtype=torch.float32, device=device).sum(-1)

    fn = {"naive": naive, "plain": plain_chunked, "chunked": ours, "control": control}[variant]
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    exact = _reset_peak()
    base = _rss_bytes("VmRSS")
    t0 = time.perf_counter()
    with torch.set_grad_enabled(grad):
        out = fn()
        if grad and variant != "control":
            (out * weights).sum().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    hwm = _rss_bytes("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = {"peak_rss": hwm - base, "method": "VmHWM" if exact else "ru_maxrss", "seconds": seconds}
    if cuda:
        res["peak_cuda"] = torch.cuda.max_memory_allocated() - base_cuda
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="B*T rows")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--default-malloc", action="store_true", help="do not pin glibc's mmap threshold")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "DTYPE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(_child(*args.child, args.tokens, args.vocab, args.temperature, args.device)))
        return

    def run(variant: str, dtype: str, mode: str) -> dict:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, dtype, mode, "--tokens",
               str(args.tokens), "--vocab", str(args.vocab), "--temperature", str(args.temperature),
               "--device", args.device]
        env = dict(os.environ)
        if not args.default_malloc:
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    f32_mib = args.tokens * args.vocab * 4 / MiB
    print(f"tokens={args.tokens} vocab={args.vocab} T={args.temperature} device={args.device}; "
          f"one float32 (tokens x vocab) tensor = {f32_mib:.0f} MiB")
    ctrl = run("control", "fp32", "fwd")
    print(f"control (allocates exactly {f32_mib:.0f} MiB): measured {ctrl['peak_rss'] / MiB:.0f} MiB "
          f"via {ctrl['method']}")
    cuda = args.device == "cuda"
    head = (f"{'dtype':6} {'mode':14} {'naive MiB':>10} {'plain-chunk MiB':>16} {'ours MiB':>9} {'naive/ours':>10} "
            f"{'naive s':>8} {'ours s':>7}")
    if cuda:
        head += f" {'naive cuda MiB':>15} {'ours cuda MiB':>14} {'ratio':>6}"
    print(head)
    for dtype in ("bf16", "fp32"):
        for mode in ("fwd+bwd", "fwd (no_grad)"):
            m = "fwd+bwd" if mode == "fwd+bwd" else "fwd"
            a, p, b = run("naive", dtype, m), run("plain", dtype, m), run("chunked", dtype, m)
            line = (f"{dtype:6} {mode:14} {a['peak_rss'] / MiB:10.0f} {p['peak_rss'] / MiB:16.0f} "
                    f"{b['peak_rss'] / MiB:9.0f} {a['peak_rss'] / max(b['peak_rss'], 1):10.1f} "
                    f"{a['seconds']:8.2f} {b['seconds']:7.2f}")
            if cuda:
                line += (f" {a['peak_cuda'] / MiB:15.0f} {b['peak_cuda'] / MiB:14.0f} "
                         f"{a['peak_cuda'] / max(b['peak_cuda'], 1):6.1f}")
            print(line, flush=True)
    print("peak = extra memory above the allocated logits at the high-water mark; fwd+bwd includes logits.grad "
          "(logits' dtype), which every variant produces. plain-chunk = per-chunk logsumexp without a custom "
          "backward; ours = kpo_lightning.logprobs.token_logprobs.")


if __name__ == "__main__":
    main()
