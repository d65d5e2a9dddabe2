"""Softmax regression: standardise the features, one linear layer, the library's softmax."""

from __future__ import annotations

import torch
from torch import nn

import triton_softmax as ts


class SoftmaxRegression(nn.Module):
    """Multinomial logistic regression; with two classes, plain logistic regression.

    ``probabilities = softmax(linear((x - feature_mean) / feature_std))``, where the mean and
    standard deviation of the training features are buffers (saved with the weights and exported to
    ONNX). Probabilities come from ``triton_softmax.softmax``; the training loss from
    ``triton_softmax.linear_cross_entropy``, which fuses the linear layer into the loss so
    that the logits are never held (what matters at thousands of classes).

    Args:
        n_features: number of input features, at least 1.
        n_classes: number of classes, at least 2.
    """

    def __init__(self, n_features: int, n_classes: int) -> None:
        super().__init__()
        if n_features < 1:
            raise ValueError(f"n_features must be at least 1, got {n_features}")
        if n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {n_classes}")
        self.n_features = n_features
        self.n_classes = n_classes
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.linear = nn.Linear(n_features, n_classes)

    @torch.no_grad()
    def fit_normalization(self, features: torch.Tensor) -> None:
        """Set the standardisation from training features (population std; 1 where it is 0).

        Args:
            features: float tensor of shape (N, n_features), N >= 1.
        """
        self._check(features)
        x = features.to(torch.float64)
        std = x.std(dim=0, correction=0)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        self.feature_mean.copy_(x.mean(dim=0))
        self.feature_std.copy_(std)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Unnormalised class scores.

        Args:
            features: float32 tensor of shape (N, n_features).

        Returns:
            float32 tensor of shape (N, n_classes).
        """
        return self.linear(self._standardised(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities through ``triton_softmax.softmax``.

        Args:
            features: float32 tensor of shape (N, n_features).

        Returns:
            float32 tensor of shape (N, n_classes); rows sum to 1.
        """
        return ts.softmax(self.logits(features), dim=-1)

    def loss(self, features: torch.Tensor, target: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """Cross-entropy of the logits through ``triton_softmax.linear_cross_entropy`` (the
        linear layer and the loss in one; the logits are never held).

        Args:
            features: float32 tensor of shape (N, n_features).
            target: int64 class indices of shape (N,), or float class probabilities (one-hot or
                soft) of shape (N, n_classes).
            **kwargs: passed on to ``triton_softmax.linear_cross_entropy`` (``weight``,
                ``reduction``, ``label_smoothing``, ...).

        Returns:
            The loss; a scalar with the default ``reduction="mean"``.
        """
        return ts.linear_cross_entropy(
            self._standardised(features),
            self.linear.weight,
            target,
            linear_bias=self.linear.bias,
            **kwargs,
        )

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Index of the most probable class.

        Args:
            features: float32 tensor of shape (N, n_features).

        Returns:
            int64 tensor of shape (N,).
        """
        return self(features).argmax(dim=-1)

    def _standardised(self, features: torch.Tensor) -> torch.Tensor:
        self._check(features)
        return (features - self.feature_mean) / self.feature_std

    def _check(self, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.n_features:
            raise ValueError(
                f"expected features of shape (N, {self.n_features}), got {tuple(features.shape)}"
            )

    def extra_repr(self) -> str:
        return f"n_features={self.n_features}, n_classes={self.n_classes}"
