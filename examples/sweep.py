"""A learning-rate sweep: twelve jobs, each on a tenth of a GPU, run side by side with `map`.

    python examples/sweep.py            # needs a running Cumulus (`cumulus up`)

Ten 0.1 shares fit on one GPU, so the sweep packs a whole device; `map` keeps at most
`concurrency` jobs in flight and returns the results in the order of the inputs.
"""

from __future__ import annotations

import cumulus


def fit(lr: float, epochs: int = 20) -> float:
    """Plain gradient descent on y = 3x + 0.5; the final loss for this learning rate."""
    data = [(x / 10, 3 * x / 10 + 0.5) for x in range(-10, 11)]
    w = b = loss = 0.0
    for _ in range(epochs):
        gw = gb = loss = 0.0
        for x, y in data:
            err = w * x + b - y
            loss += err * err / len(data)
            gw += 2 * err * x / len(data)
            gb += 2 * err / len(data)
        w, b = w - lr * gw, b - lr * gb
    print(f"lr={lr}: loss {loss:.5f}")
    return loss


if __name__ == "__main__":
    rates = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    with cumulus.Client() as client:
        losses = client.map(fit, rates, gpu=0.1, duration=600, concurrency=12)
    best_loss, best_lr = min(zip(losses, rates, strict=True))
    for lr, loss in zip(rates, losses, strict=True):
        print(f"{lr:5}  {loss:.6f}{'  <- best' if lr == best_lr else ''}")
    assert losses == [fit(lr) for lr in rates]  # same values, same order as a local loop
