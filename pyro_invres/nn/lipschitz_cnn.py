"""Convolutional networks with a guaranteed Lipschitz bound, for image i-ResNet blocks.

Each convolution is spectrally normalised *as an operator* on its input shape (power
iteration with ``conv2d`` and ``conv_transpose2d``), to ``c ** (1 / L)`` for ``L`` layers;
the activations are 1-Lipschitz, so ``Lip(g) <= c`` in the Euclidean norm of the whole
image. Kernel sizes follow Residual Flows' 3-1-3 pattern by default.

References:
    [1] Chen et al., *Residual Flows for Invertible Generative Modeling*, NeurIPS 2019.
        arXiv:1906.02735
    [2] Gouk et al., *Regularisation of Neural Networks by Enforcing Lipschitz Continuity*,
        Machine Learning 2021. arXiv:1804.04368
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from .activations import expansion, make_activation
from .lipschitz_mlp import _check_lipschitz
from .spectral import spectral_norm

__all__ = ["LipschitzCNN"]


class LipschitzCNN(nn.Module):
    """A fully convolutional ``g: R^{C x H x W} -> R^{C x H x W}`` with ``Lip(g) <= c``.

    .. math::

        g = K_L \\circ \\phi \\circ \\cdots \\circ \\phi \\circ K_1, \\qquad
        \\|K_l\\|_{\\mathrm{op}} \\le c^{1/L}

    Arguments:
        input_shape: ``(C, H, W)``.
        hidden_channels: channels of the hidden layers.
        kernel_sizes: one odd kernel size per layer (``len(hidden_channels) + 1``);
            default ``3, 1, ..., 1, 3``.
        lipschitz: the bound ``c`` in ``(0, 1)``.
        activation: a name from :data:`~pyro_invres.nn.activations.ACTIVATIONS`.
        activation_kwargs: options of the activation (``beta``, ``omega``).
        **spectral_kwargs: passed to :func:`~pyro_invres.nn.spectral_norm`.

    Example:
        >>> import torch
        >>> g = LipschitzCNN((2, 4, 4), [8, 8])
        >>> g(torch.randn(3, 2, 4, 4)).shape
        torch.Size([3, 2, 4, 4])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden_channels: Sequence[int],
        kernel_sizes: Sequence[int] | None = None,
        lipschitz: float = 0.9,
        activation: str = "lipswish",
        activation_kwargs: Mapping[str, object] | None = None,
        **spectral_kwargs: object,
    ) -> None:
        super().__init__()
        act_kwargs = {**dict(activation_kwargs or {}), "dim": -3}  # channels
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or any(s < 1 for s in shape):
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {shape}")
        self.lipschitz = _check_lipschitz(lipschitz)
        self.input_shape = shape
        channels = [shape[0], *[int(h) for h in hidden_channels], shape[0]]
        n_layers = len(channels) - 1
        if kernel_sizes is None:
            kernel_sizes = [3] if n_layers == 1 else [3, *([1] * (n_layers - 2)), 3]
        kernel_sizes = [int(k) for k in kernel_sizes]
        if len(kernel_sizes) != n_layers or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(
                f"need {n_layers} odd kernel sizes (one per layer), got {kernel_sizes}"
            )
        per_layer = self.lipschitz ** (1.0 / n_layers)
        layers: list[nn.Module] = []
        width = 1  # CLipSwish doubles the channels the next layer sees
        for i, (c_in, c_out, k) in enumerate(zip(channels[:-1], channels[1:], kernel_sizes)):
            conv = nn.Conv2d(c_in * width, c_out, k, padding=k // 2)
            in_shape = (c_in * width, *shape[1:])
            layers.append(spectral_norm(conv, per_layer, input_shape=in_shape, **spectral_kwargs))
            if i < n_layers - 1:
                layers.append(make_activation(activation, **act_kwargs))
                width = expansion(layers[-1])
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[:-3]
        out = self.net(x.reshape(-1, *x.shape[-3:]))
        return out.reshape(*batch, *out.shape[-3:])
