"""Leave-one-subject-out (LOSO) evaluation with a fixed schedule, pooled predictions and resume.

The package: ``config`` (the schedule), ``views`` (what a network sees: inputs, mirror,
translations), ``trainer`` (folds trained together), ``nested`` (epoch counts chosen by an
inner CV), ``runner`` (chunks, worker processes, resume), ``results`` (pooled scores) and
``provenance`` (commit, CPU, time). Its API is re-exported here.

Every fold is trained with the same schedule and scored once: at the end of a fixed number of
epochs (``select_epochs="fixed"``), or at the epoch count that an inner subject-wise CV on the
fold's training subjects chose (``"nested"``); nothing is chosen by looking at the held-out
subject. The "best epoch per test subject" number that much
published code reports is computed beside it from periodic evaluations, and kept apart under the
key ``leaky_best_epoch`` so it can be compared with papers but never mistaken for the honest one.

Speed: the networks are tiny, so one fold at a time leaves a CPU idle between kernel launches.
Folds are therefore trained together, several at once, as one vectorised ensemble
(``torch.func.stack_module_state`` + ``vmap``): each fold keeps its own weights, BatchNorm
statistics, optimiser state, mini-batches and augmentation draws, all seeded by the fold's index,
so a fold's result does not depend on which folds share its chunk. Adam (and its weight decay)
acts element-wise, so one optimiser over the stacked parameters is exactly one optimiser per
fold.

On a CPU with few cores, vectorising pays only for the larger networks; small ones train
faster as separate worker processes (``workers``), each running its share of the folds with
its own threads. The folds are the same either way: a fold's seeds depend on its index only.

Resume: the run directory holds ``config.json``, one ``fold_XX.json`` per finished fold and a
checkpoint of the chunk in progress (saved every ``checkpoint_every`` epochs, read back with
``torch.load(weights_only=True)``). Rerunning the same command skips finished folds and
continues the chunk from its checkpoint. The nested selection keeps each inner model's
predictions (``inner_KK_G.json``) until its fold's choice is written (``nested_XX.json``).

Outer models trained only to their chosen epoch (``outer_epochs="chosen"``): the nested
selection runs first, then each outer model trains up to the epoch its fold's inner CV chose
and stops. The learning rate is constant and evaluations leave the weights alone, so the model
at that epoch is the same as in a run that goes on to the end (tested): the honest scores and
the CV ensemble are unchanged, for a fraction of the outer training. What is lost is what needs
the later epochs: the LEAKY best-epoch figure and the fixed-schedule figure of the same run.
"""

from training.loso.config import OUTER_EPOCHS, RESULTS_FORMAT, LosoConfig, LosoWorkerError
from training.loso.nested import (NESTED_RULE, inner_groups, inner_jobs, select_epochs_full,
                                  select_epochs_nested)
from training.loso.provenance import git_commit, host_cpu
from training.loso.results import LosoResults, Prediction, ResultsError
from training.loso.runner import run_loso
from training.loso.trainer import (build_network, check_model, class_weighted_loss,
                                   keeps_freed_memory, train_models, trains_channels_last)
from training.loso.views import (average_over_test_views, hflip_maps, model_inputs, normalise,
                                 predict_probs, shift_images, translations)

__all__ = ["LosoConfig", "LosoWorkerError", "run_loso", "hflip_maps", "shift_images", "normalise",
           "train_models", "git_commit", "host_cpu", "select_epochs_nested",
           "select_epochs_full", "NESTED_RULE", "model_inputs", "predict_probs", "translations",
           "average_over_test_views", "trains_channels_last", "keeps_freed_memory",
           "class_weighted_loss", "build_network", "check_model", "RESULTS_FORMAT",
           "OUTER_EPOCHS", "inner_jobs", "inner_groups", "LosoResults", "Prediction",
           "ResultsError"]
