"""KTO: Kahneman-Tversky Optimization on unpaired desirable / undesirable examples."""

from __future__ import annotations

import torch

from dpo_cli.logprobs import KL_ROWS, SequenceLogps
from dpo_cli.losses.base import Loss, LossOutput, Reduce, check_beta, local, output, raise_problems


class KTOLoss(Loss):
    """KTO (Ethayarajh et al., 2024, Eq. 7 and 8): a prospect-theory value of each example's
    implied reward relative to a reference point z0, the policy's KL from the reference:

        h = pi(y|x) - ref(y|x)                                  (summed log-probs)
        z0 = max(0, mean over the batch of [pi(y'|x) - ref(y'|x)])    (detached)
        desirable y:    lambda_D (1 - sigmoid(beta (h - z0)))
        undesirable y:  lambda_U (1 - sigmoid(beta (z0 - h)))
        loss = mean over all examples of the batch

    (x, y') are mismatched prompt/completion pairs of the same micro batch (the KL rows: each
    prompt with the previous example's completion), scored without gradients; z0 is averaged
    over processes (`reduce`) during training and clamped at zero, as in TRL's KTOTrainer.
    **Summed** log-probs; needs a reference. Rewards are beta * h for the desirable (CHOSEN)
    and undesirable (REJECTED) examples; the metric `kl` is z0.

    Data: unpaired rows (`data=kto`: prompt, completion, label), or pairs, whose chosen
    response counts as desirable and rejected response as undesirable. A training micro batch
    needs at least two examples, or the KL rows would match their own prompts; an eval batch of
    one takes another eval example's completion (`evaluate.make_batch`).
    The paper uses beta = 0.1; TRL recommends keeping lambda_D n_D / (lambda_U n_U) in
    [1, 4/3] for n_D desirable and n_U undesirable examples (the paper's Eq. 8 discussion).
    Equals TRL's KTOTrainer (loss_type="kto").

    Keys:
        beta: reward scale; > 0 (paper: 0.1).
        desirable_weight: lambda_D, weight of desirable examples' losses; > 0.
        undesirable_weight: lambda_U, > 0; keep lambda_D n_D / (lambda_U n_U) in about [1, 4/3]
            (TRL's advice).
    """

    paired = False
    needs = frozenset({KL_ROWS})

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        problems: list[str] = []
        check_beta(problems, beta)
        for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
            if not w > 0:
                problems.append(
                    f"{name}={w} must be > 0 (balance them so that lambda_D n_D / lambda_U n_U is about 1 to 4/3)"
                )
        raise_problems(problems)
        self.beta = float(beta)
        self.desirable_weight = float(desirable_weight)
        self.undesirable_weight = float(undesirable_weight)

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None, reduce: Reduce = local) -> LossOutput:
        assert reference is not None, "KTOLoss requires reference log-probs"
        assert "kl" in policy and "kl" in reference, "KTOLoss needs the batch's KL rows"
        kl = reduce((policy["kl"].logps - reference["kl"].logps).mean().detach()).clamp(min=0)
        hw = policy["chosen"].logps - reference["chosen"].logps
        hl = policy["rejected"].logps - reference["rejected"].logps
        losses = torch.cat(
            (
                self.desirable_weight * (1 - torch.sigmoid(self.beta * (hw - kl))),
                self.undesirable_weight * (1 - torch.sigmoid(self.beta * (kl - hl))),
            )
        )
        return output(losses, self.beta * hw, self.beta * hl, kl=kl)
