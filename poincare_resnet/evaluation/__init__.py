"""Evaluation: accuracy / OOD metrics, OOD scores, adversarial attacks, explanations, plots,
tables."""

from .attacks import (
    ATTACKS,
    PAPER_FGSM_EPS,
    angular,
    fgsm,
    margin_loss,
    pgd,
    robust_accuracy,
    zero_grad_fraction,
)
from .explain import grad_cam, input_saliency, normalize_maps
from .metrics import (
    accuracy_topk,
    confusion_matrix,
    ood_metrics,
    ood_roc_curve,
    per_class_accuracy,
)
from .ood import (
    OOD_SET_NAMES,
    SCORE_FUNCTIONS,
    collect_outputs,
    energy_score,
    eval_mode,
    evaluate_ood,
    feature_norm_score,
    make_ood_sets,
    msp_score,
    ood_rows_from_scores,
    score_outputs,
)
from .plots import (
    plot_accuracy_vs_eps,
    plot_confusion_matrix,
    plot_explanations,
    plot_roc_curves,
    plot_score_histograms,
    plot_training_curves,
)
from .robustness import correct_under_attack, worst_case_correct
from .square_attack import square
from .tables import write_table, write_table_atomic

__all__ = [
    "ATTACKS",
    "OOD_SET_NAMES",
    "PAPER_FGSM_EPS",
    "SCORE_FUNCTIONS",
    "accuracy_topk",
    "angular",
    "collect_outputs",
    "confusion_matrix",
    "correct_under_attack",
    "energy_score",
    "eval_mode",
    "evaluate_ood",
    "feature_norm_score",
    "fgsm",
    "grad_cam",
    "input_saliency",
    "make_ood_sets",
    "margin_loss",
    "msp_score",
    "normalize_maps",
    "ood_metrics",
    "ood_roc_curve",
    "ood_rows_from_scores",
    "pgd",
    "per_class_accuracy",
    "plot_accuracy_vs_eps",
    "plot_confusion_matrix",
    "plot_explanations",
    "plot_roc_curves",
    "plot_score_histograms",
    "plot_training_curves",
    "robust_accuracy",
    "score_outputs",
    "square",
    "write_table",
    "worst_case_correct",
    "write_table_atomic",
    "zero_grad_fraction",
]
