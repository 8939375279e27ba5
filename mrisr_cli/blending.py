"""Parameter blending between the PSNR-oriented and the GAN-oriented generator.

Equation 3 of Wang et al. (2020): ``theta = alpha * theta_PSNR + (1 - alpha) * theta_GAN``, so
``alpha = 1`` is the PSNR model and ``alpha = 0`` the GAN model. (The paper's Fig. 5 caption and
ESRGAN's interpolation script use the opposite convention; equation 3 wins.) Every floating
tensor of the state is blended, BatchNorm running statistics included; integer buffers such as
``num_batches_tracked`` are taken from the PSNR model.
"""

from __future__ import annotations

import torch

from mrisr_cli.errors import MrisrError, WeightsError
from mrisr_cli.weights import WeightsFile


def check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise MrisrError(f"--alpha must lie in [0, 1] (1 = PSNR model, 0 = GAN model), got {alpha}")
    return float(alpha)


def blend_states(
    psnr: dict[str, torch.Tensor], gan: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``alpha * psnr + (1 - alpha) * gan`` over every floating tensor."""
    alpha = check_alpha(alpha)
    if psnr.keys() != gan.keys():
        missing = sorted(set(psnr) ^ set(gan))[:3]
        raise WeightsError(f"the two models have different tensors (e.g. {missing})")
    blended: dict[str, torch.Tensor] = {}
    for name, p in psnr.items():
        g = gan[name]
        if p.shape != g.shape:
            raise WeightsError(
                f"tensor {name!r} differs in shape: {tuple(p.shape)} vs {tuple(g.shape)}"
            )
        if p.is_floating_point():
            blended[name] = alpha * p + (1.0 - alpha) * g
        else:
            blended[name] = p.clone()
    return blended


def blend_weights(psnr: WeightsFile, gan: WeightsFile, alpha: float) -> WeightsFile:
    """A new in-memory weights file for the blended generator; refuses unlike models."""
    if psnr.network != gan.network:
        raise WeightsError(
            f"cannot blend {psnr.path} ({psnr.network.name} {psnr.network.params}) with "
            f"{gan.path} ({gan.network.name} {gan.network.params}): different networks"
        )
    if psnr.degradation != gan.degradation:
        raise WeightsError(
            f"cannot blend {psnr.path} with {gan.path}: trained on differently degraded data"
        )
    return WeightsFile(
        state=blend_states(psnr.state, gan.state, alpha),
        network=psnr.network,
        degradation=psnr.degradation,
        provenance={"blend": {"alpha": alpha, "psnr": psnr.sha256, "gan": gan.sha256}},
        path=None,
    )
