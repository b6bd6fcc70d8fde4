"""The evaluation value of SecCL's type (b) message: the macro F-score.

"Participants use ... the sklearn toolkit to evaluate the parameters from participants,
where the F-score is the average of each class to evaluate a multi-class classifier"
(SecCL, "Experimental Evaluation"): :func:`sklearn.metrics.f1_score` with
``average="macro"`` over the classes present in the labels or the predictions; a class
never predicted counts 0 (``zero_division=0``), without a warning.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fairbus.errors import SecclError


def macro_f_score(labels: npt.ArrayLike, predictions: npt.ArrayLike) -> float:
    """The unweighted mean over classes of the F1 score, in [0, 1]."""
    from sklearn.metrics import f1_score  # imported when used: scikit-learn loads slowly

    y = np.asarray(labels)
    p = np.asarray(predictions)
    if y.ndim != 1 or p.shape != y.shape or y.size == 0:
        raise SecclError(f"F-score of {p.shape} predictions for {y.shape} labels")
    if y.dtype.kind not in "iu" or p.dtype.kind not in "iu":
        raise SecclError("labels and predictions must be class numbers")
    return float(f1_score(y, p, average="macro", zero_division=0))
