"""Preference losses: small objects called with per-sequence log-probs, returning the batch loss
and implicit rewards (`base.LossOutput`).

Capability flags (`requires_reference`, `paired`, `needs`) tell the training loop what a loss
needs; the loop never compares loss names. Adding a variant means a class in this package (its
docstring: formula, paper and equation, reduction, reference or not, what its rewards mean,
recommended hyperparameters) plus a YAML file in `conf/loss/`.

    paired.py          reference-based losses on pairs (DPO, IPO, robust, hinge, ...), with the
                       f-divergence, LD-DPO and WPO modifiers
    reference_free.py  SimPO, CPO, ORPO, SimPER, SFT
    kto.py             KTO on unpaired desirable / undesirable examples
    combination.py     weighted sums of terms
"""

from dpo_cli.logprobs import RoleValues, SequenceLogps
from dpo_cli.losses.base import Loss, LossOutput
from dpo_cli.losses.combination import Combination
from dpo_cli.losses.kto import KTOLoss
from dpo_cli.losses.paired import (
    AOTLoss,
    AOTUnpairedLoss,
    APODownLoss,
    APOZeroLoss,
    BCOPairLoss,
    CalDPOLoss,
    DiscoPOPLoss,
    DPOLoss,
    DPOPLoss,
    EXOPairLoss,
    HingeLoss,
    IPOLoss,
    NCAPairLoss,
    RDPOLoss,
    RobustDPOLoss,
    SigmoidNormLoss,
    SPPOHardLoss,
)
from dpo_cli.losses.reference_free import CPOLoss, ORPOLoss, SFTLoss, SimPERLoss, SimPOLoss

__all__ = [
    "AOTLoss",
    "AOTUnpairedLoss",
    "APODownLoss",
    "APOZeroLoss",
    "BCOPairLoss",
    "CPOLoss",
    "CalDPOLoss",
    "Combination",
    "DPOLoss",
    "DPOPLoss",
    "DiscoPOPLoss",
    "EXOPairLoss",
    "HingeLoss",
    "IPOLoss",
    "KTOLoss",
    "Loss",
    "LossOutput",
    "NCAPairLoss",
    "ORPOLoss",
    "RDPOLoss",
    "RobustDPOLoss",
    "RoleValues",
    "SFTLoss",
    "SPPOHardLoss",
    "SequenceLogps",
    "SigmoidNormLoss",
    "SimPERLoss",
    "SimPOLoss",
]
