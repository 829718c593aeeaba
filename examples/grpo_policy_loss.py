#!/usr/bin/env python
"""A GRPO-style clipped policy loss with an entropy bonus, from the policy's hidden states, with
``celoss.linear_token_logprobs`` -- checked against the plain-PyTorch composition that builds the
full (sequences x positions x vocabulary) logits.

Per group of G completions of the same prompt, the advantage of a completion is its reward
normalized within the group; per response token, with r = exp(log p_new - log p_old)::

    loss = -mean_tokens(min(r A, clip(r, 1 - eps, 1 + eps) A)) - beta * mean_tokens(entropy)

Log-probabilities and entropies are those of ``softmax(logits / temperature)`` (the sampling
temperature). Prompt and padding positions carry ``ignore_index`` (-100): no log-prob, no
entropy, no gradient, no matrix-product work. ``shift=True`` scores position t against token t + 1.

    python examples/grpo_policy_loss.py                 # CPU, a few seconds
    python examples/grpo_policy_loss.py --device cuda --vocab 151936 --dtype bfloat16

Prints both losses and the largest gradient differences, and exits non-zero if they disagree.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import celoss


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """Rewards (B * G,) normalized within each group of G completions of one prompt."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)


def policy_loss(logp, entropy, old_logp, adv, mask, clip_eps, beta):
    """Clipped surrogate + entropy bonus, averaged over the response tokens (``mask``)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    n = mask.sum()
    return -(surrogate * mask).sum() / n - beta * (entropy * mask).sum() / n


def torch_logprobs(hidden, weight, labels, temperature):
    """The plain-PyTorch composition: full logits, log_softmax, gather; entropy from log_softmax."""
    logits = F.linear(hidden[:, :-1], weight).float() / temperature
    lp = torch.log_softmax(logits, -1)
    tgt = labels[:, 1:]
    ignored = tgt == -100
    logp = lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0)
    entropy = -(lp.exp() * lp).sum(-1).masked_fill(ignored, 0)
    return logp, entropy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4, help="completions per prompt (G)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--clip-eps", type=float, default=0.2)
    ap.add_argument("--beta", type=float, default=0.01, help="entropy bonus")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    b, t, d, v = args.prompts * args.group, args.seq_len, args.d_model, args.vocab

    # the policy's last hidden states and LM head (a real run: model(ids).last_hidden_state, model.lm_head)
    hidden = torch.randn(b, t, d, device=dev).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device=dev) * d ** -0.5 * 2).to(dtype).requires_grad_()
    ids = torch.randint(0, v, (b, t), device=dev)
    labels = ids.clone()
    labels[:, :args.prompt_len] = -100  # the prompt is not scored
    lengths = torch.randint(args.prompt_len + 8, t + 1, (b,), device=dev)
    labels[torch.arange(t, device=dev)[None, :] >= lengths[:, None]] = -100  # padding after EOS
    mask = (labels[:, 1:] != -100).float()
    rewards = torch.randn(b, device=dev)
    adv = group_advantages(rewards, args.group)

    # the behaviour policy's log-probs (here: the current ones, perturbed; in a run: from the rollout)
    with torch.no_grad():
        old = celoss.linear_token_logprobs(hidden, weight, labels, temperature=args.temperature, shift=True)
        old_logp = old + 0.05 * torch.randn_like(old) * mask

    results = {}
    for name in ("celoss", "torch"):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        if name == "celoss":
            logp, entropy = celoss.linear_token_logprobs(hidden, weight, labels, temperature=args.temperature,
                                                     shift=True, return_entropy=True)
        else:
            logp, entropy = torch_logprobs(hidden, weight, labels, args.temperature)
        loss = policy_loss(logp, entropy, old_logp, adv, mask, args.clip_eps, args.beta)
        loss.backward()
        seconds = time.perf_counter() - start
        results[name] = (loss.detach().float(), hidden.grad.float().clone(), weight.grad.float().clone())
        print(f"{name:>6}: loss {loss.item():+.7f}  (forward + backward {seconds * 1e3:.0f} ms)")

    (la, ha, wa), (lb, hb, wb) = results["celoss"], results["torch"]
    dh, dw = (ha - hb).abs().max().item(), (wa - wb).abs().max().item()
    print(f"|loss diff| {abs(la - lb).item():.2e}   max |d hidden diff| {dh:.2e}   max |d weight diff| {dw:.2e}")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    ok = (torch.allclose(la, lb, rtol=tol, atol=tol) and dh <= tol * (1 + hb.abs().max().item())
          and dw <= tol * (1 + wb.abs().max().item()))
    print("match" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
