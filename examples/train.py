"""A PyTorch-style training function on half a GPU.

    python examples/train.py                # needs a running Cumulus (`cumulus up`)
    cumulus run examples/train.py:train     # the same function, from the command line

(Not `cumulus run examples/train.py`: that runs this file as a job, and a job does not submit
jobs of its own.)

It trains with torch where the job's Python has it (and uses the GPU share the job was given),
and falls back to the same loop in plain Python where it has not, so it runs anywhere.
"""

from __future__ import annotations

import os
import random

import cumulus


def make_data(n: int = 256, seed: int = 0) -> list[tuple[float, float]]:
    """Points on y = 3x + 0.5, with a little noise."""
    rng = random.Random(seed)
    return [(x, 3 * x + 0.5 + rng.gauss(0, 0.05)) for x in (rng.uniform(-1, 1) for _ in range(n))]


def _train_torch(data: list[tuple[float, float]], epochs: int, lr: float) -> dict[str, float]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    xs = torch.tensor([[x] for x, _ in data], device=device)
    ys = torch.tensor([[y] for _, y in data], device=device)
    model = torch.nn.Linear(1, 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss = torch.tensor(0.0)
    for epoch in range(epochs):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xs), ys)
        loss.backward()
        optimizer.step()
        if epoch % 10 == 0 or epoch == epochs - 1:
            print(f"epoch {epoch}: loss {loss.item():.4f} on {device}")
    return {"w": model.weight.item(), "b": model.bias.item(), "loss": loss.item()}


def _train_python(data: list[tuple[float, float]], epochs: int, lr: float) -> dict[str, float]:
    w = b = loss = 0.0
    for epoch in range(epochs):
        gw = gb = loss = 0.0
        for x, y in data:
            err = w * x + b - y
            loss += err * err / len(data)
            gw += 2 * err * x / len(data)
            gb += 2 * err / len(data)
        w, b = w - lr * gw, b - lr * gb
        if epoch % 10 == 0 or epoch == epochs - 1:
            print(f"epoch {epoch}: loss {loss:.4f} (plain Python)")
    return {"w": w, "b": b, "loss": loss}


@cumulus.remote(gpu=0.5, duration=600)
def train(epochs: int = 30, lr: float = 0.5) -> dict[str, float]:
    """Fit y = wx + b; returns the weights and the last loss."""
    print(
        f"job {os.environ.get('CUMULUS_JOB_ID', '(local)')}: "
        f"GPU share {os.environ.get('CUMULUS_GPU_AMOUNT', '-')}"
    )
    data = make_data()
    try:
        import torch  # noqa: F401
    except ImportError:
        return _train_python(data, epochs, lr)
    return _train_torch(data, epochs, lr)


if __name__ == "__main__":
    result = train.remote(epochs=30)
    print(f"w={result['w']:.2f} b={result['b']:.2f} loss={result['loss']:.4f}")
    assert abs(result["w"] - 3) < 0.2, result
    assert abs(result["b"] - 0.5) < 0.1, result
