"""PAR (Prior-Approximate Router) training: fit each factorized layer's router and experts to the frozen dense FFN.

The default recipe's story, one file per idea, in the order the trainer runs them for each layer:
  labels.py     PAR pseudo-labels (the K experts whose outputs are closest to the teacher) and the losses
  router.py     Adam on the router to predict its labels (+ the balance loss)
  refit.py      closed-form least-squares refit of the experts' down projections to the teacher
  per_token.py  per-token K at the same mean: best expert sets -> router -> thresholds -> refit
  trainer.py    the pass over the layers on the factorized model's own inputs, modes, end-to-end distillation
"""
from .labels import (balance_loss, combination_labels, label_accuracy, layer_labels, pseudo_labels, router_bce_loss,
                     router_kl_loss)
from .per_token import best_sets, min_experts, per_token_rounds, subset_masks, tune_thresholds
from .refit import normal_equations, refit_down
from .router import lr_at, train_router
from .trainer import LayerStream, TrainingCancelled, TrainResult, train

__all__ = ["balance_loss", "combination_labels", "label_accuracy", "layer_labels", "pseudo_labels",
           "router_bce_loss", "router_kl_loss", "best_sets", "min_experts", "per_token_rounds", "subset_masks",
           "tune_thresholds", "normal_equations", "refit_down", "lr_at", "train_router", "LayerStream",
           "TrainingCancelled", "TrainResult", "train"]
