"""Every public name of cbn, used as its annotations say.

tests/test_typing.py runs ``mypy --strict`` over this file: each call must
type-check, and ``assert_type`` pins what each result is (so an annotation
that degrades to ``Any`` fails too). The file also runs as a script
(``python tests/typing_usage.py``): it is a real, small use of the package.
It is not a test module (no ``test_`` prefix), so pytest does not collect it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

import cbn
from cbn import reference

if TYPE_CHECKING:
    from typing_extensions import assert_type
else:
    def assert_type(value, _type):  # typing.assert_type is Python >= 3.11
        return value

FloatArray = NDArray[np.floating[Any]]
F64Array = NDArray[np.float64]


def layer_calls(x: NDArray[np.float32]) -> cbn.BatchNorm2d:
    layer = cbn.BatchNorm2d(3, eps=1e-5, momentum=0.1, affine=True,
                            track_running_stats=True, bias=True, axis=1,
                            dtype=np.float32, activation=None, nonfinite="propagate")
    assert_type(layer.train(), cbn.BatchNorm2d)
    y = layer.forward(x)
    assert_type(y, NDArray[Any])
    assert_type(layer(x, out=np.empty_like(x)), NDArray[Any])
    dx = layer.backward(np.ones_like(y))
    assert_type(dx, NDArray[Any])
    assert_type(layer.grad_weight, "FloatArray | None")
    assert_type(layer.grad_bias, "FloatArray | None")
    assert_type(layer.weight, "FloatArray | None")
    assert_type(layer.bias, "FloatArray | None")
    assert_type(layer.running_mean, "FloatArray | None")
    assert_type(layer.running_var, "FloatArray | None")
    assert_type(layer.num_batches_tracked, "int | None")
    assert_type(layer.training, bool)
    assert_type(layer.affine, bool)
    assert_type(layer.track_running_stats, bool)
    assert_type(layer.num_features, int)
    assert_type(layer.axis, int)
    assert_type(layer.dtype, "np.dtype[np.floating[Any]]")
    assert_type(layer.eps, float)
    assert_type(layer.momentum, "float | None")
    assert_type(layer.activation, 'Literal["relu"] | None')
    assert_type(layer.nonfinite, 'Literal["propagate", "raise", "skip"]')

    layer.weight = np.full(3, 2.0)
    layer.eps = 1e-3
    layer.momentum = None
    layer.activation = "relu"
    layer.nonfinite = "skip"
    layer.reset_parameters()
    layer.reset_running_stats()
    layer.activation = None
    assert_type(layer.eval(), cbn.BatchNorm2d)
    scale, shift = layer.fold()
    assert_type(scale, FloatArray)
    assert_type(shift, FloatArray)
    return layer


def state_and_copies(layer: cbn.BatchNorm2d) -> cbn.FrozenBatchNorm:
    state = layer.state_dict()
    assert_type(state, dict[str, NDArray[Any]])
    keys = layer.load_state_dict(state, strict=True)
    assert not keys.missing_keys and not keys.unexpected_keys
    restored = cbn.BatchNorm.from_state_dict(state, prefix="", eps=1e-5, momentum=0.1,
                                             axis=1, dtype=None, activation=None)
    assert_type(restored, cbn.BatchNorm)
    assert_type(cbn.BatchNorm2d.from_state_dict(state), cbn.BatchNorm2d)
    if importlib.util.find_spec("torch") is not None:
        module = layer.to_torch()  # Any: torch is optional
        assert_type(cbn.BatchNorm.from_torch(module, axis=1, dtype=np.float32,
                                             activation=None), cbn.BatchNorm)
        assert_type(cbn.BatchNorm2d.from_torch(module), cbn.BatchNorm2d)
    frozen = layer.freeze()
    assert_type(frozen, cbn.FrozenBatchNorm)
    return frozen


def frozen_calls(frozen: cbn.FrozenBatchNorm, x: NDArray[np.float32]) -> None:
    y = frozen.forward(x)
    assert_type(y, NDArray[Any])
    assert_type(frozen(x, out=np.empty_like(x)), NDArray[Any])
    assert_type(frozen.backward(np.ones_like(y)), NDArray[Any])
    assert_type(frozen.eps, float)
    assert_type(frozen.dtype, "np.dtype[np.floating[Any]]")
    assert_type(frozen.activation, 'Literal["relu"] | None')
    assert_type(frozen.scale, FloatArray)
    assert_type(frozen.shift, FloatArray)
    assert_type(frozen.training, Literal[False])
    assert_type(frozen.num_features, int)
    assert_type(frozen.axis, int)
    assert_type(frozen.fold(), tuple[FloatArray, FloatArray])
    state = frozen.state_dict()
    assert_type(state, dict[str, NDArray[Any]])
    again = cbn.FrozenBatchNorm(state, prefix="", eps=1e-5, axis=1, activation="relu",
                                dtype=np.float64, bias=True)
    assert_type(again, cbn.FrozenBatchNorm)
    assert_type(cbn.FrozenBatchNorm.from_state_dict(state, dtype=None),
                cbn.FrozenBatchNorm)
    assert_type(cbn.FrozenBatchNorm.of_layer(cbn.BatchNorm1d(3).eval()),
                cbn.FrozenBatchNorm)


def functions(x: NDArray[np.float32]) -> None:
    mean, var = cbn.batch_stats(x, axis=1)
    assert_type(mean, NDArray[Any])
    assert_type(cbn.batch_stats(x, out=(np.empty(3, np.float32), np.empty(3, np.float32))),
                tuple[NDArray[Any], NDArray[Any]])
    running_mean, running_var = np.zeros(3), np.ones(3)
    y = cbn.batch_norm(x, running_mean, running_var, np.ones(3), np.zeros(3),
                       training=True, momentum=0.1, eps=1e-5, axis=1, out=None,
                       activation="relu")
    assert_type(y, NDArray[Any])
    assert_type(cbn.batch_norm([[1.0, 2.0, 3.0]] * 2, running_mean, running_var),
                NDArray[Any])
    y, save_mean, save_invstd = cbn.batch_norm_forward(x, None, None, 1e-5, axis=-3)
    assert_type(save_mean, F64Array)
    assert_type(save_invstd, F64Array)
    dx, grad_weight, grad_bias = cbn.batch_norm_backward(
        np.ones_like(y), x, save_mean, save_invstd, None, axis=1, training=True, out=None)
    assert_type(dx, NDArray[Any])
    assert_type(grad_weight, NDArray[Any])
    assert_type(grad_bias, NDArray[Any])


def reference_twins(x: NDArray[np.float32]) -> None:
    mean, var = reference.batch_stats(x, axis=1)
    assert_type(mean, F64Array)
    assert_type(var, F64Array)
    assert_type(reference.batch_norm(x, np.zeros(3), np.ones(3), training=False),
                F64Array)
    y, save_mean, save_invstd = reference.batch_norm_forward(x, np.ones(3), np.zeros(3))
    assert_type(y, F64Array)
    assert_type(reference.batch_norm_backward(np.ones_like(y), x, save_mean, save_invstd),
                tuple[F64Array, F64Array, F64Array])


def folding(layer: cbn.BatchNorm2d, frozen: cbn.FrozenBatchNorm) -> None:
    weight, bias = cbn.fold_into_linear(np.ones((4, 3)), np.zeros(4),
                                        cbn.BatchNorm1d(3).eval(), position="before")
    assert_type(weight, FloatArray)
    assert_type(bias, FloatArray)
    conv = np.ones((3, 2, 3, 3), dtype=np.float32)
    assert_type(cbn.fold_into_conv(conv, None, layer, transposed=False, groups=1),
                tuple[FloatArray, FloatArray])
    assert_type(cbn.fold_into_linear(np.ones((3, 5)), None, frozen),
                tuple[FloatArray, FloatArray])


def threads_and_config() -> None:
    threads = cbn.get_num_threads()
    assert_type(threads, int)
    cbn.set_num_threads(threads)
    cbn.set_num_threads(None)
    with contextlib.redirect_stdout(io.StringIO()):
        cbn.show_config()


def main() -> None:
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    layer = layer_calls(x)
    frozen = state_and_copies(layer)
    frozen_calls(frozen, x)
    functions(x)
    reference_twins(x)
    folding(layer, frozen)
    threads_and_config()
    layers: list[cbn.BatchNorm] = [cbn.BatchNorm(3, axis=-1), cbn.BatchNorm1d(3),
                                   cbn.BatchNorm3d(3)]
    assert all(isinstance(each, cbn.BatchNorm) for each in layers)


if __name__ == "__main__":
    main()
