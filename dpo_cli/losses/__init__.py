"""Preference losses: small objects called with per-sequence values by role, returning the batch
loss and implicit rewards (`base.LossOutput`).

A loss is called as `loss(policy, reference, reduce)`, where `policy` and `reference` are
`SequenceLogps`: per-role values by name, `policy["chosen"].logps`, `.tokens`, and the extras it
declared in `needs` (`.shared`, `.wpo`, `.whole`; `policy["kl"]` for KTO's KL rows). Capability
flags (`requires_reference`, `paired`, `needs`) tell the training loop what a loss needs; the
loop never compares loss names. LD-DPO, WPO and the f-divergence are modifiers (`modifiers`),
declared once and applied around every loss that lists them in `accepts`, whose keys
(`loss.ld_alpha`, `loss.wpo`, `loss.f_divergence`, `loss.f_alpha`) it then takes.

Adding a loss is one class here (its docstring: formula, paper and equation, reduction,
reference or not, what its rewards mean, its keys and recommended hyperparameters), exported in
`__all__` (which registers its typed schema, `options.register_schemas`), one YAML file in
`conf/loss/` holding only what differs from the class's defaults, and its tests (README,
"Adding a loss").

    paired.py          reference-based losses on pairs (DPO, IPO, robust, hinge, ...)
    reference_free.py  SimPO, CPO, ORPO, SimPER, SFT
    kto.py             KTO on unpaired desirable / undesirable examples
    combination.py     weighted sums of terms
    modifiers.py       LD-DPO (inputs), WPO (outputs), f-divergence (margin)
    options.py         the typed schemas (/schema/loss/<Class>), `loss_problems`, `build_loss`
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
