"""The LOSO run's configuration: the schedule every fold is trained and scored with."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from realtime_mer.input_kinds import NETWORK_INPUT_KINDS, check_input_options


RESULTS_FORMAT = 1


# How far the outer models train: "all" (to the schedule's end: the LEAKY best-epoch and
# fixed-schedule figures come with the honest one) or "chosen" (nested runs only: each outer
# model stops at its fold's chosen epoch; the same honest scores, faster).
OUTER_EPOCHS = ("all", "chosen")

# The preprocessings a schedule trains on: "3db", the published maps the live pipeline
# reproduces; "causalnet", CausalNet's maps of the same 442 samples (both in ../shared);
# "live", the live pipeline's own maps of the raw databases' samples, computed from their
# frames by `python -m training preprocess` (the databases are licensed and not in ../shared).
MAP_SETS = ("3db", "causalnet", "live")


class LosoWorkerError(RuntimeError):
    """A worker process of a parallel LOSO run failed (its own error was printed)."""


@dataclass(frozen=True)
class LosoConfig:
    """The whole training schedule. It is written to the run directory and the results file;
    a resumed run must have the same one."""

    model: str = "ststnet"
    model_kwargs: dict = field(default_factory=dict)
    epochs: int = 300
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 5e-4
    weight_decay: float = 1e-4
    class_balanced: bool = True
    augment: str = "hflip"  # "none" or "hflip" (mirror and u -> 1 - u, probability 0.5)
    # Mixup (Zhang et al., ICLR 2018): 0 is off; alpha > 0 trains on convex mixtures
    # lam * a + (1 - lam) * b of each batch sample a with its neighbour b in the (shuffled)
    # batch, lam ~ Beta(alpha, alpha) per sample, and on the same mixture of their (class
    # weighted) losses. Applied to the network's input after the flip.
    mixup_alpha: float = 0.0
    # Label smoothing (Szegedy et al., CVPR 2016): 0 is off; eps > 0 trains each sample
    # against (1 - eps) * its one-hot label + eps / C on every class (PyTorch's convention),
    # before its class weight, so the network is not pushed to ever more confident logits.
    label_smoothing: float = 0.0
    # Random translation: 0 is off; k > 0 shifts each training sample's network input by
    # integers drawn uniformly from [-k, k] along each axis (per sample, from the fold's own
    # generator), the edge rows and columns repeated into the vacated border. Applied after
    # the flip and before mixup. Faces in the maps are aligned by their eyes, but not to the
    # pixel across subjects; the shift asks the network not to depend on that alignment.
    shift_pixels: int = 0
    # Test-time augmentation: "hflip" averages the class probabilities of the maps and of their
    # mirror image at every prediction (evaluation epochs, nested selection, the final
    # scores), as the exported engine does; "none" predicts from the maps alone.
    tta: str = "none"
    # Test-time translation: 0 is off; k > 0 also averages the class probabilities over every
    # integer offset (dy, dx) in [-k, k] x [-k, k] (the training shift's range, edges repeated
    # as there), of the maps and, with tta "hflip", of their mirror image, in the predictions
    # of held-out test subjects (the scores, the CV ensemble's members, the leaky history).
    # The inner validation predictions that the epoch count and the calibration are chosen on
    # keep tta alone ((2k + 1)^2 times fewer forward passes; the evaluations would otherwise
    # cost as much as the training), so every choice and every network is the same as in the
    # run without it.
    tta_shift: int = 0
    # Fixed per-channel normalisation (u, v, strain), applied after augmentation. Chosen a
    # priori (maps are in [0, 1]), so it carries no statistic of any held-out subject.
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    seed: int = 0
    eval_every: int = 10  # epochs between evaluations (leaky number; nested candidates)
    # "fixed": every fold is scored after ``epochs``. "nested": each fold's epoch count is
    # chosen among the evaluation epochs by an inner subject-wise CV on that fold's training
    # subjects only (``inner_folds`` groups); the test subject is never looked at.
    select_epochs: str = "fixed"
    inner_folds: int = 5
    # What the network is fed, built from the maps by realtime_mer.input_kinds.network_inputs
    # (the runtime applies the same function): "map28" (the maps), "regions5" (AHMSA-Net's
    # five-region recombination), "colour" (the colour-coded flow image at input_size x
    # input_size; MJFN) or "mcnet" (MCNet's magnified, AU-weighted colour image);
    # input_options are the kind's switches (mcnet: use_omam, use_oaum, alpha).
    input_kind: str = "map28"
    input_size: int | None = None
    input_options: dict = field(default_factory=dict)
    # Which preprocessing of the samples the networks train and choose their epochs on
    # (training.data.megc3db.MAP_SETS): "3db" (the maps the live pipeline reproduces) or
    # "causalnet" (CausalNet's whole-sequence base maps of the same samples). A run given both
    # sets scores every held-out subject on each (the cross-preprocessing figures).
    maps: str = "3db"
    # The share of training draws that take the sample's other preprocessing instead (0: the
    # run trains on ``maps`` alone; 0.5: each draw is either set at random). Needs both sets.
    other_maps_share: float = 0.0
    # The phases of the movement the network sees: 1, the onset→apex maps; 2, also the
    # apex→offset maps of the same samples (CausalNet's ``_1``; training/data/README.md),
    # stacked after them as channels 3-5, so the network is built with 6 input channels.
    # CausalNet's preprocessing has the second phase, and so has the live pipeline's ("live":
    # the maps `training preprocess` computes from the raw databases' frames); the 3DB maps
    # have not.
    phases: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer {self.optimizer!r} is not one of adam, adamw, sgd")
        if self.augment not in ("none", "hflip"):
            raise ValueError(f"augment {self.augment!r} is not one of none, hflip")
        if self.tta not in ("none", "hflip"):
            raise ValueError(f"tta {self.tta!r} is not one of none, hflip")
        if not isinstance(self.tta_shift, int) or self.tta_shift < 0:
            raise ValueError(f"tta_shift must be an integer >= 0, got {self.tta_shift!r}")
        if self.eval_every < 1:
            raise ValueError("eval_every must be >= 1")
        if not self.mixup_alpha >= 0 or not math.isfinite(self.mixup_alpha):
            raise ValueError(f"mixup_alpha must be a finite number >= 0, got {self.mixup_alpha}")
        if not 0.0 <= self.label_smoothing < 1.0:  # also rejects NaN
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not isinstance(self.shift_pixels, int) or self.shift_pixels < 0:
            raise ValueError(f"shift_pixels must be an integer >= 0, got {self.shift_pixels!r}")
        if self.select_epochs not in ("fixed", "nested"):
            raise ValueError(f"select_epochs {self.select_epochs!r} is not fixed or nested")
        if self.inner_folds < 2:
            raise ValueError("inner_folds must be >= 2")
        if self.input_kind not in NETWORK_INPUT_KINDS:
            raise ValueError(f"input_kind {self.input_kind!r} is not one of "
                             f"{', '.join(NETWORK_INPUT_KINDS)}")
        check_input_options(self.input_kind, self.input_options)
        if self.maps not in MAP_SETS:
            raise ValueError(f"maps {self.maps!r} is not one of {', '.join(MAP_SETS)}")
        if not 0.0 <= self.other_maps_share <= 1.0:  # also rejects NaN
            raise ValueError(f"other_maps_share must be in [0, 1], got {self.other_maps_share}")
        if self.maps == "live" and self.other_maps_share:
            raise ValueError("the live pipeline's maps of the raw databases have no other "
                             "preprocessing to draw from: other_maps_share must be 0")
        if (self.maps != "3db" or self.other_maps_share) and self.input_kind != "map28":
            # the facial points that regions5 and mcnet use are of the 3DB maps only
            raise ValueError(f"input kind {self.input_kind!r} is built from the 3DB maps' "
                             "facial points; a run on another preprocessing (CausalNet's, the "
                             "live maps, or a share of the other set) trains as map28 only")
        if self.phases not in (1, 2):
            raise ValueError(f"phases must be 1 or 2, got {self.phases!r}")
        if self.phases == 2 and (self.maps == "3db" or self.other_maps_share):
            raise ValueError("two phases (onset→apex and apex→offset) exist in CausalNet's "
                             "maps and in the live pipeline's maps of the raw databases only: "
                             "they need maps 'causalnet' or 'live', no share of the other set, "
                             "and input kind map28")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        # A run on the 3DB maps alone is written as before these fields existed, so its
        # schedule (and the protocol the default-engine rule groups seeds by) stays the same.
        if d["maps"] == "3db" and not d["other_maps_share"]:
            del d["maps"], d["other_maps_share"]
        if d["phases"] == 1:
            del d["phases"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LosoConfig":
        # Fields added after a file was written take the value that file's run used.
        d = {"select_epochs": "fixed", "inner_folds": 5, "input_kind": "map28",
             "input_size": None, "input_options": {}, "tta": "none", "mixup_alpha": 0.0,
             "label_smoothing": 0.0, "shift_pixels": 0, "tta_shift": 0, "maps": "3db",
             "other_maps_share": 0.0, "phases": 1, **d}
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)
