"""What a model that leaves parameters without a gradient in some backward passes tells DDP."""
from __future__ import annotations


def allow_unused_parameters(trainer, stage: str) -> None:
    """Under DDP, let a backward pass leave some of the model's parameters without a gradient (ProtoPNet's frozen
    groups in its warm and last-layer epochs; a GAN's discriminator step, which never reaches the generator), which
    DDP otherwise refuses ("parameters that were not used in producing the loss"). Call from the LightningModule's
    setup(): Lightning calls it before it wraps the model."""
    from pytorch_lightning.strategies import DDPStrategy
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    if stage == "fit" and isinstance(strategy, DDPStrategy):
        strategy._ddp_kwargs["find_unused_parameters"] = True
