"""Float64 oracle of the routed experts, written plainly: one token and one expert at a time."""

import torch


def experts_oracle(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids):
    """out[t] = sum_k w[t, k] * down[e] @ (silu(g) * u), [g; u] = gate_up[e] @ x[t], in float64."""
    num_tokens, hidden = hidden_states.shape
    inter = down_proj.shape[2]
    rows = []
    for t in range(num_tokens):
        total = torch.zeros(hidden, dtype=torch.float64)
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            projected = gate_up_proj[e] @ hidden_states[t]
            gate, up = projected[:inter], projected[inter:]
            activation = gate * torch.sigmoid(gate) * up
            total = total + topk_weights[t, k] * (down_proj[e] @ activation)
        rows.append(total)
    if not rows:
        return torch.zeros(0, hidden, dtype=torch.float64)
    return torch.stack(rows)


def experts_oracle_with_grads(hidden_states, gate_up_proj, down_proj, topk_weights, topk_ids, grad_out,
                              wrt=(0, 1, 2, 3)):
    """(out, d hidden_states, d gate_up_proj, d down_proj, d topk_weights), all float64 on the CPU,
    by float64 autograd through :func:`experts_oracle`; only the inputs numbered in ``wrt`` get
    a gradient (the others: None)."""
    inputs = [t.detach().cpu().double().requires_grad_(i in wrt)
              for i, t in enumerate((hidden_states, gate_up_proj, down_proj, topk_weights))]
    out = experts_oracle(*inputs, topk_ids.cpu())
    wanted = [t for t in inputs if t.requires_grad]
    if out.requires_grad:
        grads = torch.autograd.grad(out, wanted, grad_out.detach().cpu().double(), allow_unused=True)
    else:  # no tokens
        grads = [None] * len(wanted)
    grads = iter(torch.zeros_like(t) if g is None else g for t, g in zip(wanted, grads))
    return (out.detach(), *(next(grads) if t.requires_grad else None for t in inputs))
