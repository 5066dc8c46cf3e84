"""A two-layer network on make-moons data, trained with hand-derived backprop (numpy only).

The data: two interleaving half circles, the same generator as scikit-learn's ``make_moons``
(sklearn/datasets/_samples_generator.py, scikit-learn commit 1be0930), written here in numpy so the
example needs no scikit-learn.

The network, for inputs X (N, 2), labels y (N,) in {0, 1}:

    a = tanh(X @ W1.T + b1)          hidden layer, (N, H)
    z = a @ W2.T + b2                logits, (N, 2): the output layer is a linear layer
    L = mean_n -log softmax(z_n)[y_n]

Backprop, by hand (the derivation gradcheck exists to check):

    G   = dL/dz  = (softmax(z) - onehot(y)) / N       (the cross-entropy gradient, p - y)
    dW2 = G.T @ a,   db2 = sum_n G_n,   da = G @ W2   (the output layer: exactly the fused linear
                                                       cross-entropy family, with h = a, W = W2, b = b2)
    dz1 = da * (1 - a**2)                             (tanh' = 1 - tanh^2)
    dW1 = dz1.T @ X, db1 = sum_n dz1_n

``logits_grad`` and ``output_layer_grad`` are the very functions ``train`` uses, shaped the way
gradcheck calls them, so the tests (test_make_moons.py) check the code that trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def make_moons(n_samples: int = 200, *, noise: float | None = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half circles: X (n_samples, 2) float64 and labels y (n_samples,) in {0, 1}."""
    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2, got {n_samples}")
    rng = np.random.default_rng(seed)
    n_out = n_samples // 2
    n_in = n_samples - n_out
    outer = np.linspace(0, np.pi, n_out)
    inner = np.linspace(0, np.pi, n_in)
    X = np.vstack([np.append(np.cos(outer), 1 - np.cos(inner)),
                   np.append(np.sin(outer), 1 - np.sin(inner) - 0.5)]).T
    y = np.hstack([np.zeros(n_out, dtype=np.int64), np.ones(n_in, dtype=np.int64)])
    order = rng.permutation(n_samples)
    X, y = X[order], y[order]
    if noise is not None:
        X = X + rng.normal(scale=noise, size=X.shape)
    return X, y


def softmax(z: np.ndarray) -> np.ndarray:
    """Row softmax, shifted by the row maximum so that exp never overflows."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def loss(z: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of logits z (N, K) against class indices y (N,)."""
    shifted = z - z.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def logits_grad(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """dL/dz of the mean cross-entropy: (softmax(z) - onehot(y)) / N."""
    G = softmax(logits)
    G[np.arange(len(targets)), targets] -= 1
    return G / len(targets)


def output_layer_grad(hidden: np.ndarray, weight: np.ndarray, targets: np.ndarray, *,
                      bias: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """The output layer's gradients: (dL/da, dL/dW2) or, with a bias, (dL/da, dL/dW2, dL/db2)."""
    z = hidden @ weight.T if bias is None else hidden @ weight.T + bias
    G = logits_grad(z, targets)
    d_hidden, d_weight = G @ weight, G.T @ hidden
    return (d_hidden, d_weight) if bias is None else (d_hidden, d_weight, G.sum(axis=0))


@dataclass
class Network:
    """The parameters: W1 (H, 2), b1 (H,), W2 (2, H), b2 (2,)."""

    W1: np.ndarray
    b1: np.ndarray
    W2: np.ndarray
    b2: np.ndarray

    @classmethod
    def init(cls, hidden: int = 16, *, seed: int = 0) -> Network:
        rng = np.random.default_rng(seed)
        return cls(W1=rng.normal(scale=1.0, size=(hidden, 2)), b1=np.zeros(hidden),
                   W2=rng.normal(scale=1 / np.sqrt(hidden), size=(2, hidden)), b2=np.zeros(2))

    def hidden(self, X: np.ndarray) -> np.ndarray:
        return np.tanh(X @ self.W1.T + self.b1)

    def logits(self, X: np.ndarray) -> np.ndarray:
        return self.hidden(X) @ self.W2.T + self.b2

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        return float((self.logits(X).argmax(axis=1) == y).mean())

    def gradients(self, X: np.ndarray, y: np.ndarray, *, output_layer=output_layer_grad) -> dict[str, np.ndarray]:
        """Backprop by hand: the gradient of the mean loss for every parameter."""
        a = self.hidden(X)
        d_a, dW2, db2 = output_layer(a, self.W2, y, bias=self.b2)
        dz1 = d_a * (1 - a ** 2)
        return {"W1": dz1.T @ X, "b1": dz1.sum(axis=0), "W2": dW2, "b2": db2}


def train(X: np.ndarray, y: np.ndarray, *, hidden: int = 16, steps: int = 2000, lr: float = 0.5, seed: int = 0,
          output_layer=output_layer_grad) -> tuple[Network, list[float]]:
    """Full-batch gradient descent; returns the network and the loss before each step."""
    net = Network.init(hidden, seed=seed)
    losses = []
    for _ in range(steps):
        losses.append(loss(net.logits(X), y))
        for name, g in net.gradients(X, y, output_layer=output_layer).items():
            setattr(net, name, getattr(net, name) - lr * g)
    return net, losses


if __name__ == "__main__":
    X, y = make_moons(400, noise=0.15, seed=0)
    net, losses = train(X, y)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, training accuracy {net.accuracy(X, y):.1%}")
