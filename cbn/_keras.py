"""A layer from a Keras ``BatchNormalization`` (Keras 3, or tf.keras 2), read
through its attributes alone: cbn never imports keras.

Keras keeps ``moving = momentum * moving + (1 - momentum) * batch`` with the
biased batch variance, where cbn keeps ``(1 - momentum) * running + momentum *
batch``; so the layer gets ``momentum = 1 - keras_momentum`` and
``running_var_ddof=0``. tf.keras 2's fused kernel (``fused=True``, its default
for 4D and 5D inputs) keeps the unbiased variance instead (TensorFlow's
fused_batch_norm_op.cc applies Bessel's correction to the running variance),
so such a layer gets ``running_var_ddof=1``. Whatever cannot be reproduced
exactly is refused with a ValueError saying why; docs/conventions.md lists
the mapping.
"""
import numpy as np

from . import _convert
from ._dispatch import kernels

# Attributes every Keras BatchNormalization has once built.
REQUIRED = ("axis", "momentum", "epsilon", "center", "scale", "moving_mean",
            "moving_variance")


def layer_from_keras(cls, keras_layer):
    """BatchNorm.from_keras."""
    owner = f"{cls.__name__}.from_keras"
    missing = [name for name in REQUIRED if not hasattr(keras_layer, name)]
    if missing:
        raise TypeError(
            f"{owner} expects a keras.layers.BatchNormalization-like layer; "
            f"{type(keras_layer).__name__} has no attribute(s) {missing}"
        )
    _refuse_training_variants(cls, keras_layer, owner)
    axis = _channel_axis(keras_layer.axis, owner)
    center, scale = _flag(keras_layer.center, "center", owner), \
        _flag(keras_layer.scale, "scale", owner)
    arrays = {"moving_mean": _values(keras_layer.moving_mean, "moving_mean", owner),
              "moving_variance": _values(keras_layer.moving_variance, "moving_variance",
                                         owner)}
    if scale:
        arrays["gamma"] = _values(getattr(keras_layer, "gamma", None), "gamma", owner)
    if center:
        arrays["beta"] = _values(getattr(keras_layer, "beta", None), "beta", owner)
    num_features = _channel_count(arrays, owner)
    momentum = _momentum(keras_layer.momentum, owner)
    eps = _convert.real_number(keras_layer.epsilon, f"{owner}: epsilon")
    try:
        kernels.check_eps(eps)
    except ValueError as error:
        raise ValueError(f"{owner}: epsilon: {error}") from None
    wide = all(array.dtype == np.float64 for array in arrays.values())
    # center=True with scale=False has no gamma: a weight of ones reproduces
    # its outputs and input gradients in both modes (x * 1 is exact), but it
    # is a parameter here, with a grad_weight that an optimizer must leave out.
    layer = cls(num_features, eps=eps, momentum=momentum, affine=center or scale,
                bias=center or not scale, axis=axis,
                dtype=np.float64 if wide else np.float32,
                running_var_ddof=1 if getattr(keras_layer, "fused", None) is True else 0)
    state = {"running_mean": arrays["moving_mean"],
             "running_var": arrays["moving_variance"]}
    if center or scale:
        state["weight"] = arrays["gamma"] if scale else np.ones(num_features)
    if center:
        state["bias"] = arrays["beta"]
    layer.load_state_dict(state)
    # Keras's call computes inference unless told training=True (and always
    # with trainable=False): so does the layer until .train().
    return layer.eval()


def _refuse_training_variants(cls, keras_layer, owner):
    """ValueError for the options whose training computation cbn has no
    counterpart for (their inference is plain batch norm's)."""
    from .sync import SyncBatchNorm
    if _flag(getattr(keras_layer, "renorm", False), "renorm", owner):
        raise ValueError(
            f"{owner}: renorm=True (batch renormalization) corrects the batch "
            "statistics by (r, d) in training, which cbn does not compute; its "
            "inference is plain batch norm's: for that, build the layer with "
            "cbn.BatchNorm.from_state_dict from gamma, beta and the moving statistics"
        )
    if getattr(keras_layer, "virtual_batch_size", None) is not None:
        raise ValueError(
            f"{owner}: virtual_batch_size={keras_layer.virtual_batch_size!r} (ghost "
            "batch norm) normalizes sub-batches separately in training, which cbn "
            "does not compute"
        )
    if getattr(keras_layer, "adjustment", None) is not None:
        raise ValueError(
            f"{owner}: adjustment= rescales and shifts the normalized values in "
            "training, which cbn does not compute"
        )
    synchronized = _flag(getattr(keras_layer, "synchronized", False), "synchronized", owner)
    if synchronized and not issubclass(cls, SyncBatchNorm):
        raise ValueError(
            f"{owner}: synchronized=True averages the batch statistics over "
            f"replicas in training, which a {cls.__name__} on one process does "
            "not; use cbn.SyncBatchNorm.from_keras (statistics over MPI ranks)"
        )


def _channel_axis(axis, owner):
    """Keras's axis (an int, or tf.keras 2's list of them) as cbn's one axis."""
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            what = ("normalizes over several axes at once (parameters of more than "
                    "one dimension)" if axis else "names no axis")
            raise ValueError(f"{owner}: axis={list(axis)} {what}; cbn has one channel axis")
        axis = axis[0]
    try:
        return _convert.integer(axis, f"{owner}: axis", "an int or a list of one int")
    except TypeError:
        raise TypeError(f"{owner}: axis must be an int or a list of one int, got "
                        f"{type(axis).__name__}") from None


def _flag(value, name, owner):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _values(variable, name, owner):
    """A Keras variable's values (anything with .numpy(), or an array-like)
    as an ndarray."""
    if variable is None:
        raise ValueError(
            f"{owner}: the layer has no {name} yet: it is not built; call it on an "
            "input or build(input_shape) first"
        )
    # Keras and TensorFlow variables read out with .numpy(); tensors that need
    # a detach (PyTorch's) go through cbn's own conversion.
    read = getattr(variable, "numpy", None)
    if callable(read) and not hasattr(variable, "detach"):
        variable = read()
    return _convert.real_array(variable, f"{owner}: {name}")


def _channel_count(arrays, owner):
    shapes = {name: array.shape for name, array in arrays.items()}
    if any(len(shape) != 1 for shape in shapes.values()) or \
            len(set(shapes.values())) != 1 or not next(iter(shapes.values()))[0]:
        raise ValueError(
            f"{owner}: the variables must be 1D and of one length (one value per "
            f"channel), got shapes {shapes}"
        )
    return next(iter(shapes.values()))[0]


def _momentum(value, owner):
    """cbn's momentum (the new batch's weight) from Keras's (the old average's)."""
    keras_momentum = _convert.real_number(value, f"{owner}: momentum")
    if not 0 <= keras_momentum <= 1:
        raise ValueError(
            f"{owner}: momentum={keras_momentum!r} gives cbn momentum "
            f"1 - {keras_momentum!r} outside [0, 1]"
        )
    return 1.0 - float(keras_momentum)
