"""Audits: measure what an adversary's model learns from a protected view.

Each audit attacks one view an adversary is given and reports how far the attack gets, in numbers
that can be set against the protection's promise. The first view is a trained model's outputs
(``veil.audit.membership``): membership inference against DP and non-DP models, reporting attack
AUC, advantage, TPR at low FPR and the empirical lower bound on epsilon the attack certifies, to be
compared with the epsilon a DP accountant claims. More views are to come: secret shares as one MPC
party sees them, and decoys.
"""

from veil.audit.membership import (
    MembershipAudit,
    ShadowModel,
    audit_membership,
    compare_audits,
    loss_threshold_attack,
    membership_scores,
    plot_roc,
    reference_attack,
    shadow_model_attack,
    train_shadows,
)
from veil.audit.roc import (
    AttackResult,
    EpsilonAudit,
    attack_result,
    clopper_pearson_upper,
    epsilon_lower_bound,
    split_epsilon,
)

__all__ = [
    "AttackResult",
    "EpsilonAudit",
    "MembershipAudit",
    "ShadowModel",
    "attack_result",
    "audit_membership",
    "clopper_pearson_upper",
    "compare_audits",
    "epsilon_lower_bound",
    "loss_threshold_attack",
    "membership_scores",
    "plot_roc",
    "reference_attack",
    "shadow_model_attack",
    "split_epsilon",
    "train_shadows",
]
