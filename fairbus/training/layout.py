"""Where each model's feature layers end in its flat parameter vector, without torch.

The models of :mod:`fairbus.training.models` are ``nn.Sequential``: convolutional layers
first, fully connected ones after, and :func:`~fairbus.training.models.flatten_params`
lays the parameters out in that order. So the convolutional layers' parameters are the
vector's first :data:`FEATURE_VALUES` values; the fully connected layers (the
classifier) are the rest. Detection and the ledger read these counts (issue 13: the
contribution test measures along the feature layers, :attr:`fairbus.detection.
DetectionParams.contribution_layers`) and neither imports torch;
``tests/unit/test_training.py`` counts them again on the torch models.
"""

from __future__ import annotations

FEATURE_VALUES: dict[str, int] = {
    "digits_cnn": 4_800,
    "mnist_cnn": 52_096,
    "cifar10_cnn": 1_172_256,
}
"""Per model, how many leading values of its flat parameters are convolutional layers'."""


def feature_values(model_name: str | None) -> int | None:
    """The count of :data:`FEATURE_VALUES` for ``model_name``; None for a model without
    one (or none named), whose whole vector then counts."""
    if model_name is None:
        return None
    return FEATURE_VALUES.get(model_name)
