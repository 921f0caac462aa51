"""A tiny training forward and backward of an installed cbn, checked against
the batch-normalization formulas written in NumPy.

Run as a script from outside the source tree (cibuildwheel's test command,
tests/test_wheel.py in a fresh virtual environment), so that ``import cbn``
finds the installed wheel. Exits non-zero on any mismatch.
"""
import numpy as np

import cbn


def main():
    rng = np.random.default_rng(7)
    x = rng.normal(3.0, 2.0, size=(4, 3, 5, 6))
    dy = rng.normal(size=x.shape)
    weight = np.array([0.5, 1.0, 2.0])
    bias = np.array([-1.0, 0.0, 1.0])
    eps = 1e-5

    y, save_mean, save_invstd = cbn.batch_norm_forward(x, weight, bias, eps)
    dx, grad_weight, grad_bias = cbn.batch_norm_backward(dy, x, save_mean, save_invstd, weight)

    # Statistics over every axis but the channel axis (1); biased variance.
    axes = (0, 2, 3)
    count = x.size // x.shape[1]
    per_channel = (1, -1, 1, 1)
    mean = x.mean(axis=axes)
    invstd = 1.0 / np.sqrt(x.var(axis=axes) + eps)
    x_hat = (x - mean.reshape(per_channel)) * invstd.reshape(per_channel)
    expected_y = x_hat * weight.reshape(per_channel) + bias.reshape(per_channel)
    expected_grad_bias = dy.sum(axis=axes)
    expected_grad_weight = (dy * x_hat).sum(axis=axes)
    expected_dx = ((weight * invstd / count).reshape(per_channel)
                   * (count * dy - expected_grad_bias.reshape(per_channel)
                      - x_hat * expected_grad_weight.reshape(per_channel)))

    checks = {"y": (y, expected_y), "save_mean": (save_mean, mean),
              "save_invstd": (save_invstd, invstd), "dx": (dx, expected_dx),
              "grad_weight": (grad_weight, expected_grad_weight),
              "grad_bias": (grad_bias, expected_grad_bias)}
    for name, (got, expected) in checks.items():
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12, err_msg=name)
    print(f"cbn from {cbn.__file__}")
    cbn.show_config()
    print("cbn wheel smoke test: forward and backward match the formulas")


if __name__ == "__main__":
    main()
